#!/usr/bin/env bash
# Trains gptjax on a single-host Cloud TPU VM: get it through a queued resource (or reuse it), copy this checkout,
# install, run.
#
#   launch/tpu_vm.sh --name=gpt2-small --zone=us-west4-a --config=configs/gpt2_small.py \
#     --workdir=gs://my-bucket/runs/small -- --config.model.dtype=bfloat16 --config.data.path='corpus/*.txt'
#   launch/tpu_vm.sh --dry-run ...     # print the gcloud commands, run nothing
#
# tpu_pod.sh sources this file for the option parsing, the queued resource and the copy/install/run commands.
set -euo pipefail

usage() {
  cat <<EOF
Usage: ${0##*/} [options] [-- flags for python -m gptjax.main]

Creates a queued resource for a single-host Cloud TPU VM (or reuses an ACTIVE one, or replaces a preempted one),
waits until it is ACTIVE, copies this checkout to ~/gptjax-src on it, installs it with the tpu, gcs and hf extras
at the tested versions (constraints.txt) in ~/gptjax-venv (Python 3.11 through uv) and runs python -m gptjax.main
over ssh. Multi-host accelerator types (more than 8 chips or TensorCores) are for tpu_pod.sh.

  --name=NAME          TPU VM name                    (TPU_NAME, default gptjax-\$USER)
  --zone=ZONE          zone                           (TPU_ZONE, default us-west4-a)
  --project=PROJECT    project                        (TPU_PROJECT, default: gcloud's configured project)
  --accelerator=TYPE   single-host accelerator type   (TPU_ACCELERATOR, default v5litepod-8; e.g. v6e-8, v4-8)
  --runtime=VERSION    TPU software version           (TPU_RUNTIME, default: the one for the accelerator)
  --config=FILE        gptjax config                  (CONFIG, default configs/gpt2_small.py)
  --workdir=DIR        run directory: gs://BUCKET/PATH (kept when the VM goes), or a path on the VM's disk,
                       relative to ~/gptjax-src       (WORKDIR, default runs/<config name>)
  --gcsfuse            mount the bucket of a gs:// workdir with gcsfuse at /mnt/gcs/BUCKET and pass that path
                       (by default the run reads and writes gs:// itself)
  --spot               Spot capacity (cheaper, preemptible; rerun this command to resume from a gs:// workdir)
  --poll=SECONDS       interval between state checks  (POLL_SECONDS, default 30)
  --dry-run            print the commands instead of running them (the resource is then assumed not to exist)
  -h, --help           this text

GCLOUD (default gcloud) is the command used for gcloud; a workdir on the VM's disk goes away with the VM.
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
POLL=${POLL_SECONDS:-30}
GCSFUSE=0
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
    --gcsfuse) GCSFUSE=1 ;;
    --spot) SPOT=1 ;;
    --poll=*) POLL=${1#*=} ;;
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
  return 0
}

# Whether the accelerator type spans several hosts. Its number counts TensorCores on v2-v4 and v5p (v4-8 = 4 chips)
# and chips on v5e and v6e (v5litepod-8 = 8 chips); either way one host holds at most 8.
multi_host() {
  [[ "$ACCELERATOR" =~ -([0-9]+)$ ]] && (( BASH_REMATCH[1] > 8 ))
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

# The remote shell command that installs the copied checkout (and, with --gcsfuse, mounts the workdir's bucket).
install_command() {
  local steps=(
    "mkdir -p ~/gptjax-src"
    "tar -xzf ~/gptjax-src.tar.gz -C ~/gptjax-src"
    # TPU VM images ship Python 3.10; gptjax needs >= 3.11, which uv fetches.
    "{ command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
    "export PATH=\$HOME/.local/bin:\$PATH"
    "{ test -x ~/gptjax-venv/bin/python || uv venv --python 3.11 ~/gptjax-venv; }"
    # The tested versions; the extras serve gs:// paths (gcs) and data.path='hf:...' (hf) as in launch/README.md.
    "uv pip install -q --python ~/gptjax-venv/bin/python -c ~/gptjax-src/constraints.txt ~/gptjax-src'[tpu,gcs,hf]'"
  )
  if (( GCSFUSE )) && [[ "$WORKDIR" == gs://* ]]; then
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
  (( GCSFUSE )) && [[ "$workdir" == gs://* ]] && workdir=/mnt/gcs/${workdir#gs://}
  local args=(--config="$CONFIG")
  [[ -n "$workdir" ]] && args+=(--workdir="$workdir")
  args+=("$@" "${EXTRA[@]}")
  local quoted
  printf -v quoted ' %q' "${args[@]}"
  echo "cd ~/gptjax-src && ~/gptjax-venv/bin/python -m gptjax.main$quoted"
}

# Sets STATE to the queued resource's state, "" when it does not exist.
query_state() {
  local describe=("$GCLOUD" compute tpus queued-resources describe "$NAME" "${WHERE[@]}"
                  --format='value(state.state)')
  if (( DRY_RUN )); then
    show "${describe[@]}"
    STATE=""
  else
    STATE=$("${describe[@]}" 2>/dev/null) || STATE=""
  fi
}

create_resource() {
  local create=("$GCLOUD" compute tpus queued-resources create "$NAME" --node-id="$NAME" "${WHERE[@]}"
                --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME")
  (( SPOT )) && create+=(--spot)
  run "${create[@]}"
}

# Deletes the queued resource with its nodes, if it still exists, and waits until it is gone so that its name
# can be reused.
delete_resource() {
  if (( ! DRY_RUN )); then
    query_state
    [[ -n "$STATE" ]] || return 0
  fi
  run "$GCLOUD" compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
  (( DRY_RUN )) && return 0
  query_state
  while [[ -n "$STATE" ]]; do
    log "waiting for $NAME to be deleted ($STATE)"
    sleep "$POLL"
    query_state
  done
}

# Brings the queued resource to ACTIVE: reuses it, creates it, or replaces a preempted/failed one.
provision() {
  query_state
  case "$STATE" in
    ACTIVE) log "reusing queued resource $NAME (ACTIVE)"; return 0 ;;
    "") create_resource ;;
    SUSPENDING|SUSPENDED|FAILED)
      log "queued resource $NAME is $STATE: replacing it"; delete_resource; create_resource ;;
  esac
  if (( DRY_RUN )); then
    echo "# then the describe command every ${POLL}s until the state is ACTIVE"
    return 0
  fi
  while :; do
    query_state
    case "$STATE" in
      ACTIVE) log "queued resource $NAME is ACTIVE"; return 0 ;;
      SUSPENDING|SUSPENDED|FAILED|"") log "queued resource $NAME is ${STATE:-gone} while waiting"; return 1 ;;
    esac
    log "waiting for $NAME to be ACTIVE ($STATE)"
    sleep "$POLL"
  done
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
  if multi_host; then
    die "--accelerator=$ACCELERATOR spans several hosts: run it with launch/tpu_pod.sh (one process per host," \
      "a gs:// workdir shared by all). Processes started by hand on each host need --distributed. This script" \
      "takes single-host types such as v5litepod-8, v6e-8, v4-8 or v5p-8."
  fi
  provision || die "queued resource $NAME did not become ACTIVE; rerun this command to try again."
  copy_repo
  on_workers "$(install_command)"
  on_workers "$(train_command)"
  (( DRY_RUN )) || log "run finished; delete the TPU VM with: $GCLOUD compute tpus queued-resources delete" \
    "$NAME ${WHERE[*]} --force --quiet"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
