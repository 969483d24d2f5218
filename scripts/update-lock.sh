#!/usr/bin/env bash
# Rewrite requirements.lock from what .venv holds now: exact pins plus sha256 hashes of the
# distribution files pip picks on this platform (CPython 3.11, x86_64 Linux).
#
#   .venv/bin/pip install NEWPKG && ./scripts/update-lock.sh
set -euo pipefail

cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

.venv/bin/pip freeze --exclude-editable | grep -v '^#' | grep -v '^-e ' | sort -f >"$tmp/pins.txt"
.venv/bin/pip download -q --disable-pip-version-check --no-deps -d "$tmp/dist" \
    -r "$tmp/pins.txt" 2>&1 | grep -v 'is ignored: it is neither' || true

{
    echo "# Exact pins of runtime and dev dependencies, with hashes; installed by scripts/setup.sh."
    echo "# Regenerate with scripts/update-lock.sh (never edit by hand)."
    while IFS= read -r pin; do
        name=${pin%%==*}
        version=${pin#*==}
        # Distribution file names normalise '-' and '.' to '_'.
        norm=$(echo "$name" | tr 'A-Z.-' 'a-z__')
        # An sdist may keep the project's own spelling (libvirt-python-9.0.0.tar.gz).
        files=$(find "$tmp/dist" -maxdepth 1 \( -iname "${norm}-${version}[-.]*" \
            -o -iname "${name}-${version}[-.]*" \) | sort)
        if [ -z "$files" ]; then
            echo "update-lock.sh: no downloaded file for $pin" >&2
            exit 1
        fi
        line="$pin"
        for f in $files; do
            line="$line \\"$'\n'"    --hash=sha256:$(sha256sum "$f" | cut -d' ' -f1)"
        done
        echo "$line"
    done <"$tmp/pins.txt"
} >requirements.lock.new
mv requirements.lock.new requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) pins"
