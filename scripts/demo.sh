#!/usr/bin/env bash
# The main job on embedded defaults: back up a sample tree into a local repository, change
# the tree, back it up again, list snapshots, restore the latest and compare it with the source.
# Everything lives under var/demo/ (reset on every run). Exit status non-zero on any failure.
#
#   ./scripts/demo.sh
#   STRATAVAULT=/path/to/stratavault ./scripts/demo.sh   # another build of the CLI
set -Eeuo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEMO=$ROOT/var/demo
PY=$ROOT/.venv/bin/python
SV=${STRATAVAULT:-$ROOT/.venv/bin/stratavault}
STEP=0

step() {
    STEP=$((STEP + 1))
    printf '\n[demo %d] %s\n' "$STEP" "$*"
}
run() {
    printf '  $ %s\n' "$*"
    "$@"
}
fail() {
    echo "demo FAILED at step $STEP: $*" >&2
    exit 1
}
trap 'echo "demo FAILED at step $STEP (command exited $?)" >&2' ERR

[ -x "$SV" ] || fail "no stratavault CLI at $SV (run ./scripts/setup.sh)"

step "reset $DEMO"
rm -rf "$DEMO"
mkdir -p "$DEMO"
(umask 077 && head -c 32 /dev/urandom | base64 >"$DEMO/password")
export STRATAVAULT_REPOSITORY=$DEMO/repo
export STRATAVAULT_PASSWORD_FILE=$DEMO/password
echo "  repository $STRATAVAULT_REPOSITORY, passphrase file $STRATAVAULT_PASSWORD_FILE (mode $(stat -c %a "$DEMO/password"))"

step "generate a sample tree (files of mixed sizes, symlinks, a hard link, a sparse file, xattrs)"
run "$PY" scripts/demo_tree.py make "$DEMO/sample"
echo "  $(find "$DEMO/sample" | wc -l) entries, $(du -sh --apparent-size "$DEMO/sample" | cut -f1) apparent size"

step "create the repository"
run "$SV" init

step "first backup"
run "$SV" backup files "$DEMO/sample" --tag demo --host demo-host

step "change the tree (append, overwrite in the middle, delete, add, chmod, xattr)"
run "$PY" scripts/demo_tree.py change "$DEMO/sample"

step "second backup (incremental against the first)"
run "$SV" backup files "$DEMO/sample" --tag demo --host demo-host

step "list snapshots"
run "$SV" snapshots
count=$("$SV" snapshots --json | "$PY" -c 'import json, sys; print(len(json.load(sys.stdin)))')
[ "$count" -eq 2 ] || fail "expected 2 snapshots, 'snapshots --json' lists $count"
echo "  $count snapshots"

step "restore the latest snapshot to $DEMO/restore"
run "$SV" restore latest --target "$DEMO/restore"
# Like restic, a restore may recreate the absolute source path under the target.
restored=$DEMO/restore
if [ -d "$DEMO/restore$DEMO/sample" ]; then
    restored=$DEMO/restore$DEMO/sample
elif [ -d "$DEMO/restore/sample" ]; then
    restored=$DEMO/restore/sample
fi
echo "  restored tree: $restored"

step "compare the restore with the source (content, then metadata)"
run diff -r --no-dereference "$DEMO/sample" "$restored"
echo "  content: identical"
run "$PY" scripts/demo_tree.py compare "$DEMO/sample" "$restored" || fail "metadata differs"

trap - ERR
printf '\ndemo OK\n'
