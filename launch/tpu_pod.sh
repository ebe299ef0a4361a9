#!/usr/bin/env bash
# Train a jaxdml recipe on a Cloud TPU VM pod slice: every worker runs the
# same `python -m jaxdml.main`; jax.distributed starts itself from the TPU
# environment, and the workdir lives on a GCS bucket all workers can reach.
#
#   launch/tpu_pod.sh --name=dml-pod --zone=us-central2-b --type=v4-32 \
#       --bucket=gs://my-bucket --config=configs/sop_xbn.py [--version=tpu-ubuntu2204-base] \
#       [--spot] [--dry_run] [-- --config.batch_size=512 ...]
#
# Flags:
#   --name      TPU VM name; reused if it exists, created otherwise.
#   --zone      GCP zone with TPU capacity of that type.
#   --type      accelerator type (v4-32, v5p-64, v5litepod-16, v6e-16, ...).
#   --bucket    gs:// bucket; the workdir is BUCKET/jaxdml/NAME/CONFIG-STEM.
#   --config    recipe file (and :ARG), relative to the repository root.
#   --version   TPU VM runtime image.
#   --project   GCP project (default: gcloud's configured one).
#   --spot      create a Spot slice (preemptible; a rerun resumes from GCS).
#   --dry_run   print the gcloud commands instead of running them.
# Anything after `--` is passed to jaxdml.main on every worker.
# Data: TFDS sets are read from --config.data.data_dir (a gs:// path works).
set -euo pipefail

NAME="" ZONE="" TYPE="" BUCKET="" CONFIG="" PROJECT=""
VERSION="tpu-ubuntu2204-base" SPOT=0 DRY=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --dry_run) DRY=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for var in NAME ZONE TYPE BUCKET CONFIG; do
  if [[ -z "${!var}" ]]; then
    echo "tpu_pod.sh: --${var,,} is required (see --help)" >&2; exit 2
  fi
done
[[ "$BUCKET" == gs://* ]] || { echo "tpu_pod.sh: --bucket must start with gs://" >&2; exit 2; }

run() {
  if [[ "$DRY" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
project_flag=()
[[ -n "$PROJECT" ]] && project_flag=(--project="$PROJECT")

stem="$(basename "${CONFIG%%:*}" .py)"
workdir="${BUCKET%/}/jaxdml/${NAME}/${stem}"
repo_dir="$(cd "$(dirname "$0")/.." && pwd)"

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" "${project_flag[@]}" >/dev/null 2>&1; then
  spot_flag=()
  [[ "$SPOT" == 1 ]] && spot_flag=(--spot)
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" \
      --accelerator-type="$TYPE" --version="$VERSION" "${project_flag[@]}" "${spot_flag[@]}"
fi

# Ship this checkout (not a pip release) so every worker runs the same code.
tarball="/tmp/jaxdml-${NAME}.tar.gz"
run tar -C "$repo_dir" --exclude=.venv --exclude=.git --exclude=workdirs --exclude=.pytest_cache \
  --exclude=__pycache__ -czf "$tarball" .
run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:~/jaxdml.tar.gz" \
    --zone="$ZONE" --worker=all "${project_flag[@]}"

setup='set -e; mkdir -p ~/jaxdml && tar -C ~/jaxdml -xzf ~/jaxdml.tar.gz &&
python3 -m venv ~/jaxdml/.venv && ~/jaxdml/.venv/bin/pip install -q --upgrade pip &&
~/jaxdml/.venv/bin/pip install -q "jax[tpu]" -e ~/jaxdml'
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all \
    "${project_flag[@]}" --command="$setup"

extra_args="$(printf '%q ' "${EXTRA[@]+"${EXTRA[@]}"}")"
train="cd ~/jaxdml && .venv/bin/python -m jaxdml.main --config=$(printf '%q' "$CONFIG") \
--workdir=$(printf '%q' "$workdir") $extra_args"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all \
    "${project_flag[@]}" --command="$train"
echo "workdir: $workdir (metrics.jsonl, checkpoints/, tensorboard/)"
