#!/usr/bin/env bash
# Submit a ddps pipeline or sweep to the Ray cluster at $RAY_ADDRESS (the dashboard's http address):
#   RAY_ADDRESS=http://127.0.0.1:8265 cluster/submit.sh pipeline --preset paper --workers 4 --gpu \
#     --storage s3://your-bucket/ddps --data-root /data/ADEChallengeData2016
# Token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://127.0.0.1:8265}"
: "${RAY_AUTH_MODE:=token}"
export RAY_AUTH_MODE
exec ray job submit --address "$RAY_ADDRESS" --working-dir "$here/.." \
  --runtime-env "$here/runtime_env.yaml" -- python -m ddps "$@"
