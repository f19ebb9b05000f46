#!/bin/sh
# localserve installer for Linux and macOS.
#
#   curl -fsSL <raw URL of this file> | sh                 # install from PyPI
#   sh installers/install.sh                                # install this checkout
#   sh installers/install.sh --help
#
# Invariants:
# * Everything lives in one venv (default: <platformdirs user data dir>/localserve/venv); the only
#   files outside it are the `localserve` symlink and, with --service, one unit/agent file. A
#   manifest inside the venv records those, so --uninstall removes exactly what was written.
# * A machine without an NVIDIA GPU never gets CUDA torch: torch is installed first, pinned to a
#   CPU/ROCm build (Linux: `torch==V+cpu` / `torch==V+rocmX.Y`), and the package install that
#   follows runs under a constraint that holds torch at that exact version. A final check fails
#   the install if any nvidia-* distribution or a +cu torch ended up in the venv anyway.
# * Safe to run twice: the venv is reused, pip upgrades in place, links and units are rewritten.
# * Never deletes a directory it did not create (a venv without our manifest is refused).
set -eu

TORCH_VERSION_DEFAULT=2.13.0
ROCM_DEFAULT=rocm7.1
TORCH_INDEX_BASE=https://download.pytorch.org/whl
PYPI_NAME=localserve
SERVICE_NAME=localserve
LAUNCHD_LABEL=io.localserve.server
MANIFEST_NAME=localserve-install.txt
# Test hook: root for the /proc, /dev and /opt/rocm probes (empty = the real system).
SYSROOT=${LOCALSERVE_INSTALL_SYSROOT:-}

usage() {
    cat <<'EOF'
Usage: install.sh [options]

Installs localserve into an isolated virtual environment, with the torch build that matches this
machine (NVIDIA -> CUDA, AMD -> ROCm, Apple Silicon -> MLX + CPU torch, otherwise CPU torch), and
links the `localserve` command into a bin directory.

Options:
  --prefix DIR         venv location (default: <user data dir>/localserve/venv, i.e.
                       ${XDG_DATA_HOME:-~/.local/share}/localserve/venv on Linux,
                       ~/Library/Application Support/localserve/venv on macOS)
  --bin-dir DIR        where the `localserve` symlink goes (default: ~/.local/bin)
  --source SRC         what to install: a source directory, a pip URL (git+https://..., .tar.gz,
                       .whl) or "pypi" (default: the checkout this script lives in, else PyPI)
  --gpu KIND           skip detection: auto|nvidia|amd|apple|cpu (default: auto)
  --torch-version V    torch version to pin (default: 2.13.0)
  --torch-index URL    extra pip index for torch (default: decided per platform; the PyTorch CPU
                       index on Linux without NVIDIA only if your pip config has no CPU build)
  --python PY          interpreter for the venv, >= 3.10 (default: first python3 found)
  --service            also install and start a systemd user unit (Linux) or a launchd agent
                       (macOS) that runs `localserve up`
  --host HOST          service: address to bind (default: 127.0.0.1)
  --port PORT          service: port (default: localserve's own default)
  --model MODEL        service: model to serve (default: the embedded default model)
  --backend NAME       service: localserve backend (default: auto)
  --uninstall          remove the venv, the symlink and the service this installer created
  --dry-run            print the detection result and every command, change nothing
  -h, --help           show this help

Environment: LOCALSERVE_INSTALL_SYSROOT (tests only) prefixes the /proc, /dev and /opt/rocm probes.
EOF
}

say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Shell-quote one word for display, so a printed command can be pasted back into a shell.
shq() {
    case $1 in
        '' | *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
        *) printf '%s' "$1" ;;
    esac
}

show_cmd() {
    _line='+'
    for _w in "$@"; do
        if [ "$_w" = '|' ]; then _line="$_line |"; else _line="$_line $(shq "$_w")"; fi
    done
    printf '%s\n' "$_line"
}

# Print, then run unless --dry-run.
run() {
    show_cmd "$@"
    [ "$DRY_RUN" = 1 ] && return 0
    "$@"
}

# ---------------------------------------------------------------------------------------------
# Arguments

PREFIX=
BIN_DIR=
SOURCE=
GPU=auto
TORCH_VERSION=$TORCH_VERSION_DEFAULT
TORCH_INDEX=
PYTHON=
SERVICE=0
SERVE_HOST=127.0.0.1
SERVE_PORT=
SERVE_MODEL=
SERVE_BACKEND=
UNINSTALL=0
DRY_RUN=0

need_arg() { [ "$#" -ge 2 ] || die "$1 needs a value (see --help)"; }

while [ "$#" -gt 0 ]; do
    case $1 in
        --prefix) need_arg "$@"; PREFIX=$2; shift ;;
        --bin-dir) need_arg "$@"; BIN_DIR=$2; shift ;;
        --source) need_arg "$@"; SOURCE=$2; shift ;;
        --gpu) need_arg "$@"; GPU=$2; shift ;;
        --torch-version) need_arg "$@"; TORCH_VERSION=$2; shift ;;
        --torch-index) need_arg "$@"; TORCH_INDEX=$2; shift ;;
        --python) need_arg "$@"; PYTHON=$2; shift ;;
        --service) SERVICE=1 ;;
        --host) need_arg "$@"; SERVE_HOST=$2; shift ;;
        --port) need_arg "$@"; SERVE_PORT=$2; shift ;;
        --model) need_arg "$@"; SERVE_MODEL=$2; shift ;;
        --backend) need_arg "$@"; SERVE_BACKEND=$2; shift ;;
        --uninstall) UNINSTALL=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        --prefix=* | --bin-dir=* | --source=* | --gpu=* | --torch-version=* | --torch-index=* | \
            --python=* | --host=* | --port=* | --model=* | --backend=*)
            _opt=${1%%=*}
            _val=${1#*=}
            shift
            set -- "$_opt" "$_val" "$@"
            continue ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
    shift
done

case $GPU in auto | nvidia | amd | apple | cpu) ;; *) die "--gpu must be auto, nvidia, amd, apple or cpu" ;; esac
case $SERVE_PORT in '' | *[!0-9]*) [ -z "$SERVE_PORT" ] || die "--port must be a number" ;; esac
[ -n "${HOME:-}" ] || die "HOME is not set"

OS=$(uname -s)
ARCH=$(uname -m)
case $OS in Linux | Darwin) ;; *) die "unsupported OS '$OS' (this installer is for Linux and macOS)" ;; esac

abspath() {
    case $1 in
        /*) printf '%s' "$1" ;;
        *) printf '%s/%s' "$(pwd)" "$1" ;;
    esac
}

if [ "$OS" = Darwin ]; then
    DATA_DIR="$HOME/Library/Application Support/localserve"
else
    DATA_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/localserve"
fi
[ -n "$PREFIX" ] || PREFIX="$DATA_DIR/venv"
PREFIX=$(abspath "$PREFIX")
PREFIX=${PREFIX%/}
# The prefix is deleted by --uninstall (after the manifest check); refuse the obvious disasters anyway.
case $PREFIX in '' | / | "$HOME" | "${HOME%/}") die "--prefix must be a directory of its own, not '${PREFIX:-/}'" ;; esac
[ -n "$BIN_DIR" ] || BIN_DIR="$HOME/.local/bin"
BIN_DIR=$(abspath "$BIN_DIR")
MANIFEST="$PREFIX/$MANIFEST_NAME"

if [ "$OS" = Darwin ]; then
    SERVICE_FILE="$HOME/Library/LaunchAgents/$LAUNCHD_LABEL.plist"
else
    SERVICE_FILE="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user/$SERVICE_NAME.service"
fi

# ---------------------------------------------------------------------------------------------
# Services

systemd_usable() {
    command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1
}

launchd_domain() { printf 'gui/%s' "$(id -u)"; }

# systemd unit syntax: "%" is a specifier, and words with blanks or quotes need double quotes.
sd_word() {
    _w=$(printf '%s' "$1" | sed 's/%/%%/g')
    case $_w in
        *[[:space:]\"\\\']*) printf '"%s"' "$(printf '%s' "$_w" | sed 's/\\/\\\\/g; s/"/\\"/g')" ;;
        *) printf '%s' "$_w" ;;
    esac
}

xml_text() { printf '%s' "$1" | sed 's/&/\&amp;/g; s/</\&lt;/g; s/>/\&gt;/g'; }

# The `localserve up` command line the service runs, one word per line (words hold no newlines).
serve_words() {
    printf '%s\n' "$PREFIX/bin/localserve" up
    [ -z "$SERVE_MODEL" ] || printf '%s\n' "$SERVE_MODEL"
    printf '%s\n' --host "$SERVE_HOST"
    [ -z "$SERVE_PORT" ] || printf '%s\n' --port "$SERVE_PORT"
    [ -z "$SERVE_BACKEND" ] || printf '%s\n' --backend "$SERVE_BACKEND"
}

systemd_unit() {
    _exec=
    _nl='
'
    _old_ifs=$IFS
    IFS=$_nl
    for _w in $(serve_words); do _exec="$_exec${_exec:+ }$(sd_word "$_w")"; done
    IFS=$_old_ifs
    cat <<EOF
# Written by the localserve installer; removed by install.sh --uninstall.
[Unit]
Description=localserve OpenAI-compatible LLM server
After=network-online.target

[Service]
Type=simple
ExecStart=$_exec
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=3

[Install]
WantedBy=default.target
EOF
}

launchd_plist() {
    _log="$HOME/Library/Logs/localserve.log"
    cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- Written by the localserve installer; its uninstall option removes it (XML comments cannot hold a double dash). -->
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>$LAUNCHD_LABEL</string>
  <key>ProgramArguments</key>
  <array>
EOF
    serve_words | while IFS= read -r _w; do printf '    <string>%s</string>\n' "$(xml_text "$_w")"; done
    cat <<EOF
  </array>
  <key>EnvironmentVariables</key>
  <dict>
    <key>PYTHONUNBUFFERED</key>
    <string>1</string>
  </dict>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <key>StandardOutPath</key>
  <string>$(xml_text "$_log")</string>
  <key>StandardErrorPath</key>
  <string>$(xml_text "$_log")</string>
</dict>
</plist>
EOF
}

install_service() {
    if [ "$OS" = Darwin ]; then
        _content=$(launchd_plist)
    else
        _content=$(systemd_unit)
    fi
    if [ "$DRY_RUN" = 1 ]; then
        say "would write $SERVICE_FILE:"
        printf '%s\n' "$_content"
    else
        mkdir -p "$(dirname "$SERVICE_FILE")"
        printf '%s\n' "$_content" >"$SERVICE_FILE"
        say "wrote $SERVICE_FILE"
    fi
    if [ "$OS" = Darwin ]; then
        if command -v launchctl >/dev/null 2>&1; then
            # bootout first so a re-run picks up the new plist; it fails harmlessly when not loaded.
            show_cmd launchctl bootout "$(launchd_domain)/$LAUNCHD_LABEL"
            [ "$DRY_RUN" = 1 ] || launchctl bootout "$(launchd_domain)/$LAUNCHD_LABEL" >/dev/null 2>&1 || true
            run launchctl bootstrap "$(launchd_domain)" "$SERVICE_FILE" ||
                warn "launchctl bootstrap failed; load it later with: launchctl bootstrap $(launchd_domain) '$SERVICE_FILE'"
            say "logs: ~/Library/Logs/localserve.log"
        else
            warn "launchctl not found: the agent is not loaded"
        fi
    elif systemd_usable; then
        run systemctl --user daemon-reload
        run systemctl --user enable "$SERVICE_NAME.service"
        run systemctl --user restart "$SERVICE_NAME.service"
        say "status: systemctl --user status $SERVICE_NAME; logs: journalctl --user -u $SERVICE_NAME"
        say "to keep it running after you log out: loginctl enable-linger \"\$USER\""
    else
        say "systemctl --user is not usable here (no systemd user session): the unit is not enabled."
        say "enable it later with: systemctl --user daemon-reload && systemctl --user enable --now $SERVICE_NAME"
    fi
}

# Remove the service file only when it runs this venv's localserve (another install may own it).
remove_service() {
    [ -f "$SERVICE_FILE" ] || return 0
    if ! grep -F "$PREFIX/bin/localserve" "$SERVICE_FILE" >/dev/null 2>&1; then
        say "leaving $SERVICE_FILE: it does not run $PREFIX"
        return 0
    fi
    if [ "$OS" = Darwin ]; then
        if command -v launchctl >/dev/null 2>&1; then
            show_cmd launchctl bootout "$(launchd_domain)/$LAUNCHD_LABEL"
            [ "$DRY_RUN" = 1 ] || launchctl bootout "$(launchd_domain)/$LAUNCHD_LABEL" >/dev/null 2>&1 || true
        fi
        run rm -f "$SERVICE_FILE"
    elif systemd_usable; then
        run systemctl --user disable --now "$SERVICE_NAME.service" || true
        run rm -f "$SERVICE_FILE"
        run systemctl --user daemon-reload
    else
        run rm -f "$SERVICE_FILE"
    fi
}

# ---------------------------------------------------------------------------------------------
# Uninstall

is_our_venv() { [ -f "$PREFIX/pyvenv.cfg" ] && [ -f "$MANIFEST" ]; }

if [ "$UNINSTALL" = 1 ]; then
    if [ -e "$PREFIX" ] && ! is_our_venv; then
        die "$PREFIX is not a venv made by this installer (no $MANIFEST_NAME): not touching it"
    fi
    _link=
    _made_bin=
    if [ -f "$MANIFEST" ]; then
        _link=$(sed -n 's/^bin_link=//p' "$MANIFEST")
        _made_bin=$(sed -n 's/^bin_dir_created=//p' "$MANIFEST")
        _svc=$(sed -n 's/^service=//p' "$MANIFEST")
        [ -z "$_svc" ] || SERVICE_FILE=$_svc
    fi
    [ -n "$_link" ] || _link="$BIN_DIR/localserve"
    say "uninstalling localserve from $PREFIX"
    remove_service
    if [ -L "$_link" ]; then
        case $(readlink "$_link") in
            "$PREFIX"/*) run rm -f "$_link" ;;
            *) say "leaving $_link: it points elsewhere" ;;
        esac
    fi
    # The bin dir goes only if this installer created it and nothing else moved in since.
    if [ -n "$_made_bin" ] && [ -d "$_made_bin" ] && [ -z "$(ls -A "$_made_bin")" ]; then
        run rmdir "$_made_bin"
    fi
    if [ -e "$PREFIX" ]; then
        run rm -rf "$PREFIX"
    else
        say "nothing installed at $PREFIX"
    fi
    # The data dir may also hold models and caches; it goes only when nothing else is left.
    if [ "$PREFIX" = "$DATA_DIR/venv" ] && [ -d "$DATA_DIR" ]; then
        run rmdir "$DATA_DIR" 2>/dev/null || say "kept $DATA_DIR (models, caches): remove it yourself if unwanted"
    fi
    say "localserve uninstalled"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Detection

ACCEL=
ACCEL_DETAIL=

detect_accel() {
    if [ "$OS" = Darwin ]; then
        if [ "$ARCH" = arm64 ]; then
            ACCEL=apple ACCEL_DETAIL="macOS on Apple Silicon ($ARCH)"
        else
            ACCEL=cpu ACCEL_DETAIL="macOS on $ARCH"
        fi
        return 0
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        _gpus=$(nvidia-smi -L 2>/dev/null | grep '^GPU' || true)
        if [ -n "$_gpus" ]; then
            ACCEL=nvidia ACCEL_DETAIL="nvidia-smi: $(printf '%s\n' "$_gpus" | head -n 1)"
            return 0
        fi
    fi
    for _g in "$SYSROOT"/proc/driver/nvidia/gpus/*; do
        if [ -e "$_g" ]; then
            ACCEL=nvidia ACCEL_DETAIL="NVIDIA driver with a GPU in /proc/driver/nvidia/gpus"
            return 0
        fi
    done
    if command -v rocminfo >/dev/null 2>&1; then
        _agent=$(rocminfo 2>/dev/null | grep -o 'gfx[0-9a-f]*' | grep -v '^gfx000$' | head -n 1 || true)
        if [ -n "$_agent" ]; then
            ACCEL=amd ACCEL_DETAIL="rocminfo: $_agent"
            return 0
        fi
    fi
    if [ -e "$SYSROOT/dev/kfd" ]; then
        ACCEL=amd ACCEL_DETAIL="AMD GPU driver (/dev/kfd)"
        return 0
    fi
    ACCEL=cpu ACCEL_DETAIL="no NVIDIA, AMD or Apple GPU found"
}

if [ "$GPU" = auto ]; then
    detect_accel
else
    ACCEL=$GPU ACCEL_DETAIL="forced with --gpu"
fi

# ROCm wheels are published per ROCm minor version; follow the installed ROCm when we can see it.
rocm_tag() {
    _v=$(sed -n '1s/^\([0-9]*\)\.\([0-9]*\).*/\1.\2/p' "$SYSROOT/opt/rocm/.info/version" 2>/dev/null || true)
    if [ -n "$_v" ]; then printf 'rocm%s' "$_v"; else printf '%s' "$ROCM_DEFAULT"; fi
}

# TORCH_SPEC pins the exact build. TORCH_PROBE=1: try the user's pip configuration first and add
# the PyTorch index only if it cannot supply that build.
TORCH_PROBE=0
case $ACCEL in
    nvidia)
        EXTRA=cuda
        TORCH_SPEC="torch==$TORCH_VERSION" # PyPI's Linux wheels are the CUDA builds
        ;;
    amd)
        EXTRA=rocm
        _tag=$(rocm_tag)
        TORCH_SPEC="torch==$TORCH_VERSION+$_tag"
        [ -n "$TORCH_INDEX" ] || TORCH_INDEX="$TORCH_INDEX_BASE/$_tag"
        ;;
    apple)
        # Only the CPU backend ships today, so MLX machines get it as the fallback too.
        EXTRA=mlx,cpu
        TORCH_SPEC="torch==$TORCH_VERSION" # macOS wheels on PyPI are CPU/MPS builds
        ;;
    cpu)
        EXTRA=cpu
        if [ "$OS" = Linux ]; then
            TORCH_SPEC="torch==$TORCH_VERSION+cpu" # PyPI's Linux wheels would pull CUDA
            [ -n "$TORCH_INDEX" ] || TORCH_PROBE=1
        else
            TORCH_SPEC="torch==$TORCH_VERSION"
        fi
        ;;
esac

# ---------------------------------------------------------------------------------------------
# Python and source

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; }

if [ -n "$PYTHON" ]; then
    python_ok "$PYTHON" || die "--python $PYTHON is not a Python >= 3.10"
else
    for _p in python3 python3.13 python3.12 python3.11 python3.10 python; do
        if command -v "$_p" >/dev/null 2>&1 && python_ok "$_p"; then PYTHON=$_p; break; fi
    done
    [ -n "$PYTHON" ] || die "no Python >= 3.10 found; install one or pass --python PATH"
fi
PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')

is_localserve_tree() { grep -q '^name *= *"localserve"' "$1/pyproject.toml" 2>/dev/null; }

# Default source: the checkout holding this script (installers/install.sh), else PyPI. Under
# `curl ... | sh` $0 is the shell itself, so the checkout test fails and PyPI is used.
if [ -z "$SOURCE" ]; then
    SOURCE=pypi
    case $0 in
        */install.sh | install.sh)
            _here=$(cd "$(dirname "$0")/.." 2>/dev/null && pwd || true)
            if [ -n "$_here" ] && is_localserve_tree "$_here"; then SOURCE=$_here; fi
            ;;
    esac
fi

SOURCE_KIND=url
case $SOURCE in
    pypi) SOURCE_KIND=pypi ;;
    *://* | git+*) SOURCE_KIND=url ;;
    *)
        [ -d "$SOURCE" ] || die "--source $SOURCE: no such directory (give a directory, a URL or 'pypi')"
        SOURCE=$(cd "$SOURCE" && pwd)
        is_localserve_tree "$SOURCE" || die "--source $SOURCE has no pyproject.toml for localserve"
        SOURCE_KIND=dir
        ;;
esac

# ---------------------------------------------------------------------------------------------
# Plan

say "platform: $OS $ARCH, Python $PY_VERSION ($PYTHON)"
say "accelerator: $ACCEL ($ACCEL_DETAIL)"
say "extra: localserve[$EXTRA]; torch: $TORCH_SPEC"
say "venv: $PREFIX"
say "source: $SOURCE"
say "command link: $BIN_DIR/localserve"
[ "$SERVICE" = 0 ] || say "service: $SERVICE_FILE"
[ "$DRY_RUN" = 0 ] || say "dry run: nothing will be changed"

if [ -e "$PREFIX" ] && ! is_our_venv; then
    if [ -d "$PREFIX" ] && [ -z "$(ls -A "$PREFIX" 2>/dev/null)" ]; then
        : # an empty directory is fine to build in
    else
        die "$PREFIX exists and is not a localserve venv made by this installer; choose another --prefix"
    fi
fi

VPY="$PREFIX/bin/python"
if [ -x "$VPY" ] && is_our_venv; then
    say "reusing the existing venv"
else
    if [ "$DRY_RUN" = 0 ]; then
        "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null ||
            die "$PYTHON cannot create venvs (on Debian/Ubuntu: apt install python3-venv)"
    fi
    run "$PYTHON" -m venv "$PREFIX"
    # The manifest marks the directory as ours from the start, so a failed install can be uninstalled.
    [ "$DRY_RUN" = 1 ] || printf 'installer=localserve\n' >"$MANIFEST"
fi

# In a dry run there is no venv yet: probe with the interpreter that would create it (same pip config).
if [ "$DRY_RUN" = 1 ] && ! [ -x "$VPY" ]; then PROBE_PY=$PYTHON; else PROBE_PY=$VPY; fi

if [ "$TORCH_PROBE" = 1 ]; then
    if "$PROBE_PY" -m pip install --dry-run --no-deps --ignore-installed --quiet --retries 1 --timeout 20 \
        "$TORCH_SPEC" >/dev/null 2>&1; then
        say "torch: $TORCH_SPEC is available through your pip configuration"
    else
        TORCH_INDEX="$TORCH_INDEX_BASE/cpu"
        say "torch: your pip configuration has no $TORCH_SPEC; adding the PyTorch CPU index"
    fi
fi

INDEX_ARGS=
[ -z "$TORCH_INDEX" ] || INDEX_ARGS=yes

# Copy the source tree without VCS data, build outputs, caches or a venv placed inside it.
stage_source() {
    set -- --exclude=./.git --exclude=./build --exclude=./dist --exclude=./.venv --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude='.*_cache' --exclude=./.hypothesis
    case $PREFIX in "$SOURCE"/*) set -- "$@" --exclude="./${PREFIX#"$SOURCE"/}" ;; esac
    show_cmd tar -C "$SOURCE" -cf - "$@" . '|' tar -C "$STAGE" -xf -
    [ "$DRY_RUN" = 1 ] || tar -C "$SOURCE" -cf - "$@" . | tar -C "$STAGE" -xf -
}

pip_install() {
    if [ -n "$INDEX_ARGS" ]; then
        run "$VPY" -m pip install --extra-index-url "$TORCH_INDEX" "$@"
    else
        run "$VPY" -m pip install "$@"
    fi
}

torch_hint() {
    die "could not install $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX}; try --torch-version, --torch-index or --gpu"
}

# Step 1: torch alone, so the build is chosen by our pin and nothing else.
pip_install "$TORCH_SPEC" || torch_hint

# Step 2: the package, with torch held at the exact build from step 1.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/localserve-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
CONSTRAINTS="$WORK/constraints.txt"
if [ "$DRY_RUN" = 1 ]; then
    _torch_pin=$TORCH_SPEC
else
    _torch_pin="torch==$("$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
fi
printf '%s\n' "$_torch_pin" >"$CONSTRAINTS"
say "constraint: $_torch_pin"

case $SOURCE_KIND in
    pypi)
        pip_install --upgrade -c "$CONSTRAINTS" "${PYPI_NAME}[$EXTRA]"
        ;;
    url)
        case $SOURCE in *.git | *.git@*) case $SOURCE in git+*) ;; *) SOURCE="git+$SOURCE" ;; esac ;; esac
        pip_install --upgrade -c "$CONSTRAINTS" "${PYPI_NAME}[$EXTRA] @ $SOURCE"
        ;;
    dir)
        # Build from a snapshot so the checkout gets no build/ or egg-info litter from setuptools.
        STAGE="$WORK/src"
        mkdir -p "$STAGE"
        stage_source
        # A local directory is always rebuilt and reinstalled, so re-running picks up source changes.
        pip_install --upgrade -c "$CONSTRAINTS" "${STAGE}[$EXTRA]"
        ;;
esac

# ---------------------------------------------------------------------------------------------
# Verify

if [ "$DRY_RUN" = 0 ]; then
    if [ "$ACCEL" != nvidia ]; then
        _cuda=$("$VPY" -c '
import importlib.metadata as m
bad = sorted({d.metadata["Name"] for d in m.distributions() if d.metadata["Name"].lower().startswith("nvidia-")})
if "+cu" in m.version("torch"):
    bad.append("torch " + m.version("torch"))
print(" ".join(bad))')
        [ -z "$_cuda" ] || die "CUDA packages ended up in $PREFIX on a machine without an NVIDIA GPU: $_cuda"
    else
        # A CPU build in the user's find-links outranks PyPI's plain version (its local label sorts higher).
        case $("$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))') in
            *+cpu*) warn "got a CPU torch on an NVIDIA machine (your pip config supplies one); pass --torch-index https://download.pytorch.org/whl/cu130 (your CUDA) to fix" ;;
        esac
    fi
    "$PREFIX/bin/localserve" --help >/dev/null || die "$PREFIX/bin/localserve --help failed"
    say "installed: $("$VPY" -c 'import importlib.metadata as m; print("localserve", m.version("localserve"), "with torch", m.version("torch"))')"
fi

# ---------------------------------------------------------------------------------------------
# Command link, service, manifest

LINK="$BIN_DIR/localserve"
LINKED=0
BIN_DIR_CREATED=0
# Remember across re-runs that the bin dir is ours, so --uninstall may remove it once empty.
[ "$(sed -n 's/^bin_dir_created=//p' "$MANIFEST" 2>/dev/null || true)" != "$BIN_DIR" ] || BIN_DIR_CREATED=1
if [ -e "$LINK" ] && ! [ -L "$LINK" ]; then
    warn "$LINK exists and is not a symlink: leaving it; run $PREFIX/bin/localserve directly"
else
    [ -d "$BIN_DIR" ] || BIN_DIR_CREATED=1
    run mkdir -p "$BIN_DIR"
    run ln -sfn "$PREFIX/bin/localserve" "$LINK"
    LINKED=1
fi

[ "$SERVICE" = 0 ] || install_service

if [ "$DRY_RUN" = 0 ]; then
    {
        printf 'installer=localserve\n'
        printf 'accelerator=%s\n' "$ACCEL"
        printf 'extra=%s\n' "$EXTRA"
        printf 'source=%s\n' "$SOURCE"
        [ "$LINKED" = 0 ] || printf 'bin_link=%s\n' "$LINK"
        [ "$BIN_DIR_CREATED" = 0 ] || printf 'bin_dir_created=%s\n' "$BIN_DIR"
        [ "$SERVICE" = 0 ] || printf 'service=%s\n' "$SERVICE_FILE"
    } >"$MANIFEST"
fi

if [ "$LINKED" = 1 ]; then
    case ":${PATH:-}:" in
        *":$BIN_DIR:"*) ;;
        *)
            case ${SHELL:-} in
                */zsh) _rc=.zshrc ;;
                */bash) _rc=.bashrc ;;
                *) _rc=.profile ;;
            esac
            say "$BIN_DIR is not on your PATH; add it, e.g.:"
            # shellcheck disable=SC2016 # $PATH is meant literally: the user's shell expands it
            printf '    echo '\''export PATH="%s:$PATH"'\'' >> ~/%s\n' "$BIN_DIR" "$_rc"
            ;;
    esac
fi

if [ "$DRY_RUN" = 1 ]; then
    say "dry run complete"
else
    say "done. Start the server with: localserve up"
fi
