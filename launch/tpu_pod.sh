#!/usr/bin/env bash
# Trains gptjax on a multi-host Cloud TPU pod slice through a queued resource, restarting after preemptions.
#
#   launch/tpu_pod.sh --name=gpt2-xl --zone=us-west4-a --accelerator=v5litepod-64 --spot \
#     --config=configs/gpt2_xl.py --workdir=gs://my-bucket/runs/xl -- --config.model.dtype=bfloat16
#   launch/tpu_pod.sh --dry-run ...     # print the gcloud commands, run nothing
#
# Every worker runs the same command; JAX's multi-controller runtime joins them (--distributed). Each attempt
# resumes from the newest checkpoint in the workdir, so a restart loses at most the steps since the last save.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/tpu_vm.sh"

usage() {
  cat <<EOF
Usage: ${0##*/} --workdir=gs://BUCKET/PATH [options] [-- flags for python -m gptjax.main]

Creates a queued resource (or reuses an ACTIVE one), waits until it is ACTIVE, copies this checkout to every
worker, installs it as tpu_vm.sh does, and runs python -m gptjax.main --distributed on all workers
(--worker=all). When the run exits non-zero or the resource is preempted (SUSPENDED), deletes and recreates the
resource and reruns: the run resumes from the newest checkpoint in the workdir.

  --name=NAME          queued resource and node id    (TPU_NAME, default gptjax-\$USER)
  --zone=ZONE          zone                           (TPU_ZONE, default us-west4-a)
  --project=PROJECT    project                        (TPU_PROJECT, default: gcloud's configured project)
  --accelerator=TYPE   accelerator type               (TPU_ACCELERATOR, default v5litepod-8; e.g. v5litepod-64)
  --runtime=VERSION    TPU software version           (TPU_RUNTIME, default: the one for the accelerator)
  --config=FILE        gptjax config                  (CONFIG, default configs/gpt2_small.py)
  --workdir=gs://B/P   run directory shared by all workers, passed to the run as it is (WORKDIR, required)
  --gcsfuse            mount the bucket with gcsfuse at /mnt/gcs/B on each worker and pass that path instead
  --spot               Spot capacity (cheaper, preemptible)
  --max-restarts=N     recreate-and-resume attempts after the first (MAX_RESTARTS, default 5)
  --poll=SECONDS       interval between state checks  (POLL_SECONDS, default 30)
  --dry-run            print the commands instead of running them (the resource is then assumed not to exist)
  -h, --help           this text

GCLOUD (default gcloud) is the command used for gcloud.
EOF
}

MAX_RESTARTS=${MAX_RESTARTS:-5}

pod_main() {
  while (( $# )); do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --max-restarts=*) MAX_RESTARTS=${1#*=} ;;
      --) shift; EXTRA=("$@"); break ;;
      *) parse_common "$1" || die "unknown option $1 (see --help)" ;;
    esac
    shift
  done
  [[ "$WORKDIR" == gs://?*/?* ]] || die "--workdir=${WORKDIR:-(none)}: every worker must see the same checkpoints;" \
    "pass a GCS path such as gs://my-bucket/runs/xl."
  [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts=$MAX_RESTARTS: expected a count such as 5."
  finish_options

  local attempt
  for (( attempt = 0; ; attempt++ )); do
    if (( attempt > 0 )); then
      (( attempt <= MAX_RESTARTS )) || die "giving up after $MAX_RESTARTS restarts; the checkpoints stay in" \
        "$WORKDIR: rerun this command to resume."
      log "restart $attempt of $MAX_RESTARTS: recreating $NAME, the run resumes from $WORKDIR"
      delete_resource
    fi
    # A fresh resource has fresh disks: copy and install on every attempt. --distributed: JAX finds the other
    # workers through the TPU metadata, which an ssh session's environment does not advertise.
    if provision && copy_repo && on_workers "$(install_command)" && on_workers "$(train_command --distributed)"; then
      (( DRY_RUN )) || log "run finished; delete the resource with: $GCLOUD compute tpus queued-resources" \
        "delete $NAME ${WHERE[*]} --force --quiet"
      return 0
    fi
    query_state
    log "attempt $attempt failed (queued resource ${STATE:-gone})"
  done
}

pod_main "$@"
