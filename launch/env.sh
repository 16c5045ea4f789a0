# Settings for launch/launch.py (and the tpu_vm.sh / xpk.sh / vertex.sh wrappers): copy this
# file, fill it in, `source` it. Flags on the command line win over these. The wrappers check
# the ones every command needs with ${VAR?} and stop at once when one is unset.
export PROJECT=${PROJECT-}                       # gcloud project (empty: gcloud's default)
export ZONE=${ZONE-us-central2-b}                # v4: us-central2-b; v5e: us-west4-a
export REGION=${REGION-us-central1}              # Vertex AI
export TPU_NAME=${TPU_NAME-realm-trainer}        # trainer TPU VM
export ACCELERATOR_TYPE=${ACCELERATOR_TYPE-v4-32}
export BUILDER_NAME=${BUILDER_NAME-realm-builder}  # index-builder TPU VM (smaller)
export BUILDER_ACCELERATOR_TYPE=${BUILDER_ACCELERATOR_TYPE-v4-8}
export RUNTIME_VERSION=${RUNTIME_VERSION-tpu-ubuntu2204-base}  # v5e: v2-alpha-tpuv5-lite
export CONFIG=${CONFIG-experiments/realm_wiki.py:size=base}
export WORKDIR=${WORKDIR-}                       # gs://BUCKET/runs/NAME, required
export REPO_URL=${REPO_URL-}                     # empty: `tpu_vm.sh scp` copies git HEAD
export REPO_REF=${REPO_REF-main}
export EXTRAS=${EXTRAS-tpu,gcs}
export CLUSTER=${CLUSTER-}                       # XPK / GKE cluster
export DOCKER_IMAGE=${DOCKER_IMAGE-}             # built from launch/Dockerfile
export WORKLOAD_PREFIX=${WORKLOAD_PREFIX-realm}
