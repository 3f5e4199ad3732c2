#!/usr/bin/env bash
# Trains gptjax on a single-host Cloud TPU VM: create the VM (or reuse it), copy this checkout, install, run.
#
#   launch/tpu_vm.sh --name=gpt2-small --zone=us-west4-a --config=configs/gpt2_small.py \
#     -- --config.model.dtype=bfloat16 --config.data.path='corpus/*.txt'
#   launch/tpu_vm.sh --dry-run ...     # print the gcloud commands, run nothing
#
# tpu_pod.sh sources this file for the option parsing and the copy/install/run commands.
set -euo pipefail

usage() {
  cat <<EOF
Usage: ${0##*/} [options] [-- flags for python -m gptjax.main]

Creates (or reuses) a single-host Cloud TPU VM, copies this checkout to ~/gptjax-src on it, installs it with
jax[tpu] in ~/gptjax-venv (Python 3.11 through uv) and runs python -m gptjax.main over ssh.

  --name=NAME          TPU VM name                    (TPU_NAME, default gptjax-\$USER)
  --zone=ZONE          zone                           (TPU_ZONE, default us-west4-a)
  --project=PROJECT    project                        (TPU_PROJECT, default: gcloud's configured project)
  --accelerator=TYPE   accelerator type               (TPU_ACCELERATOR, default v5litepod-8)
  --runtime=VERSION    TPU software version           (TPU_RUNTIME, default: the one for the accelerator)
  --config=FILE        gptjax config                  (CONFIG, default configs/gpt2_small.py)
  --workdir=DIR        run directory on the VM, relative to ~/gptjax-src, or gs://BUCKET/PATH (mounted with
                       gcsfuse at /mnt/gcs/BUCKET)    (WORKDIR, default runs/<config name>)
  --spot               create a Spot VM (cheaper, preemptible; rerun this command to resume)
  --dry-run            print the commands instead of running them (the VM is then assumed not to exist)
  -h, --help           this text

GCLOUD (default gcloud) is the command used for gcloud; a relative --workdir lives on the VM's disk and goes
away with the VM.
EOF
}

GCLOUD=${GCLOUD:-gcloud}
NAME=${TPU_NAME:-gptjax-${USER:-user}}
ZONE=${TPU_ZONE:-us-west4-a}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR=${TPU_ACCELERATOR:-v5litepod-8}
RUNTIME=${TPU_RUNTIME:-}
CONFIG=${CONFIG:-configs/gpt2_small.py}
WORKDIR=${WORKDIR:-}
SPOT=0
DRY_RUN=0
EXTRA=()
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "${0##*/}: $*" >&2; exit 1; }
log() { echo "[${0##*/}] $*" >&2; }

# Parses one option shared by both TPU scripts; returns 1 when it is not one of them.
parse_common() {
  case "$1" in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --accelerator=*) ACCELERATOR=${1#*=} ;;
    --runtime=*) RUNTIME=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --spot) SPOT=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) return 1 ;;
  esac
}

# After the options: checks them and derives the rest. Call once parsing is done.
finish_options() {
  [[ -f "$REPO/${CONFIG%%:*}" ]] || die "--config=$CONFIG: no such file under $REPO; pass e.g. configs/gpt2_small.py."
  if [[ -z "$RUNTIME" ]]; then
    # The TPU software version has to match the chip generation.
    case "$ACCELERATOR" in
      v4-*) RUNTIME=tpu-ubuntu2204-base ;;
      v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
      *) die "--accelerator=$ACCELERATOR: no default runtime; pass --runtime=VERSION (see 'gcloud compute tpus" \
             "versions list --zone=$ZONE')." ;;
    esac
  fi
  WHERE=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
  JAX_VERSION=$(sed -n 's/.*"jax==\([^"]*\)".*/\1/p' "$REPO/pyproject.toml")
  [[ -n "$JAX_VERSION" ]] || die "no jax==VERSION pin in $REPO/pyproject.toml."
  return 0
}

# One command line, quoted so that it can be pasted into a shell.
show() {
  local out=() arg q="'"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$arg"); else out+=("'${arg//$q/$q\\$q$q}'"); fi
  done
  echo "${out[*]}"
}

# Runs a command, or prints it under --dry-run.
run() {
  if (( DRY_RUN )); then show "$@"; else "$@"; fi
}

# Packs the working tree (tracked and untracked, not ignored) and copies it to every worker.
copy_repo() {
  local tarball=/tmp/gptjax-src-$$.tar.gz status=0
  if (( DRY_RUN )); then
    echo "git -C $REPO ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $tarball"
  else
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
      | tar --null --ignore-failed-read -T - -czf "$tarball") || return 1
  fi
  run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$NAME:gptjax-src.tar.gz" "${WHERE[@]}" --worker=all || status=$?
  rm -f "$tarball"
  return "$status"
}

# The remote shell command that installs the copied checkout (and mounts the bucket of a gs:// workdir).
install_command() {
  local steps=(
    "mkdir -p ~/gptjax-src"
    "tar -xzf ~/gptjax-src.tar.gz -C ~/gptjax-src"
    # TPU VM images ship Python 3.10; gptjax needs >= 3.11, which uv fetches.
    "{ command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
    "export PATH=\$HOME/.local/bin:\$PATH"
    "{ test -x ~/gptjax-venv/bin/python || uv venv --python 3.11 ~/gptjax-venv; }"
    "uv pip install -q --python ~/gptjax-venv/bin/python ~/gptjax-src 'jax[tpu]==$JAX_VERSION'"
  )
  if [[ "$WORKDIR" == gs://* ]]; then
    local bucket=${WORKDIR#gs://}
    bucket=${bucket%%/*}
    steps+=(
      "{ command -v gcsfuse >/dev/null || { echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc]\
 https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\"\
 | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null\
 && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg\
 | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null\
 && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }; }"
      "sudo mkdir -p /mnt/gcs/$bucket && sudo chown \$USER /mnt/gcs/$bucket"
      # Orbax finalises a checkpoint by renaming its directory: gcsfuse refuses directory renames on
      # flat-namespace buckets unless allowed (hierarchical-namespace buckets rename atomically).
      "{ mountpoint -q /mnt/gcs/$bucket || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $bucket\
 /mnt/gcs/$bucket; }"
    )
  fi
  local joined
  printf -v joined '%s && ' "${steps[@]}"
  echo "${joined% && }"
}

# The remote shell command that trains; extra gptjax.main flags come as arguments.
train_command() {
  local workdir=$WORKDIR
  [[ "$workdir" == gs://* ]] && workdir=/mnt/gcs/${workdir#gs://}
  local args=(--config="$CONFIG")
  [[ -n "$workdir" ]] && args+=(--workdir="$workdir")
  args+=("$@" "${EXTRA[@]}")
  local quoted
  printf -v quoted ' %q' "${args[@]}"
  echo "cd ~/gptjax-src && ~/gptjax-venv/bin/python -m gptjax.main$quoted"
}

# Runs a remote shell command on every worker.
on_workers() {
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

main() {
  while (( $# )); do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      *) parse_common "$1" || die "unknown option $1 (see --help)" ;;
    esac
    shift
  done
  finish_options

  local state=""
  if (( DRY_RUN )); then
    show "$GCLOUD" compute tpus tpu-vm describe "$NAME" "${WHERE[@]}" --format='value(state)'
  else
    state=$("$GCLOUD" compute tpus tpu-vm describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null) \
      || state=""
  fi
  case "$state" in
    READY) log "reusing TPU VM $NAME ($ZONE)" ;;
    "")
      local create=("$GCLOUD" compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR"
                    --version="$RUNTIME")
      (( SPOT )) && create+=(--spot)
      run "${create[@]}" ;;
    *) die "TPU VM $NAME is $state, not READY: wait for it, or delete it with" \
           "'$GCLOUD compute tpus tpu-vm delete $NAME ${WHERE[*]}' and rerun." ;;
  esac
  copy_repo
  on_workers "$(install_command)"
  on_workers "$(train_command)"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
