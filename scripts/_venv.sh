# Sourced by scripts/demo and scripts/test: create or update the project's virtual environment in .venv.
#
# First run: `python3 -m venv .venv`, then PyTorch (the CPU build 2.13.0; pip finds it on local disk on our
# machines), then `pip install -e .[dev]`. Later runs skip the installs while pyproject.toml and the PyTorch
# requirement are unchanged (a stamp file in .venv records their hash), so they start in well under a second.
# Override the interpreter with PYTHON=..., the PyTorch requirement with PALP_TORCH="torch==X".

ensure_venv() {
    local root python torch stamp want
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    python="${PYTHON:-python3}"
    torch="${PALP_TORCH:-torch==2.13.0}"
    stamp="$root/.venv/.palpcompose-install-stamp"
    if [ ! -x "$root/.venv/bin/python" ]; then
        echo "creating $root/.venv ..." >&2
        "$python" -m venv "$root/.venv"
    fi
    want="$( (cat "$root/pyproject.toml"; echo "$torch") | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "installing $torch and palpcompose[dev] into .venv ..." >&2
        "$root/.venv/bin/python" -m pip install --quiet "$torch"
        "$root/.venv/bin/python" -m pip install --quiet -e "$root[dev]"
        echo "$want" > "$stamp"
    fi
    export PATH="$root/.venv/bin:$PATH"
}
