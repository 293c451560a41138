# Sourced by the tools/gpu_*.sh scripts: the set-up every GPU call of the SmolLM2 benches needs.
#
#   WHEELS   a folder of wheels to install into /tmp/site (gguf, zstandard: tools lacking on the GPU machine)
#   GGUF     the SmolLM2 GGUF, or its two halves PIECE_A (copied to /tmp by the call before) + PIECE_B
#   GIT_REV  the revision to record (the device copy's .git may be stale)
#
# Sets T0 (the call's start), PYTHONPATH and STORE: the GGUF converted once into /tmp/smolstore (~20 s; every
# run then opens in ~3 s instead of ~25 s). Exits the caller if the conversion fails.
set -u
export PYTHONUNBUFFERED=1 GIT_REV=${GIT_REV:-unknown}
T0=$(date +%s)
SITE=/tmp/site
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE "$WHEELS"/*.whl
fi
export PYTHONPATH=$SITE:$PWD
STORE=/tmp/smolstore
if [ ! -f $STORE/manifest.json ]; then
  if [ -z "${GGUF:-}" ]; then
    GGUF=/tmp/smollm2.gguf
    cat "${PIECE_A:?set GGUF or PIECE_A and PIECE_B}" "${PIECE_B:?}" > $GGUF
  fi
  python3 -m zo2tier convert "$GGUF" $STORE --no-progress || exit 1
fi
