#!/usr/bin/env bash
# A shared list in the browser: automerge-repo pages sync one list through two members of a
# 3-node cluster (`aspen node run --automerge-repo`).
#
#   examples/shared-list/run.sh           # prints two links (member 1, member 2); Ctrl-C stops
#   examples/shared-list/run.sh --check   # instead drives both pages in headless Chromium
#                                         # (installed with scripts/install-chromium.sh if
#                                         # missing) and saves screenshots (SCREENSHOT_DIR,
#                                         # default target/)
#
# Needs Node.js and npm (the page is built from npm packages with esbuild). Everything runs in
# a temporary directory on 127.0.0.1 and stops at the end. ASPEN_BIN=path/to/aspen skips the
# build of aspen.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
if [ -z "${ASPEN_BIN:-}" ]; then
  cargo build -q -p aspen-node
fi
ASPEN=$(realpath "${ASPEN_BIN:-target/debug/aspen}")
DIR=$(mktemp -d)
SERVER=
cleanup() {
  [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null
  kill $(cat "$DIR"/node-*/pid 2>/dev/null) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# field JSON_FILE EXPRESSION: a value out of JSON (with Node, which the page needs anyway).
field() {
  node -e "const v = JSON.parse(require('fs').readFileSync('$1', 'utf8')); console.log($2)"
}

echo "starting a 3-node cluster with --automerge-repo..."
"$ASPEN" up --nodes 3 --data-dir "$DIR" --detach --automerge-repo -o json > "$DIR/up.json"
WS_A=$(field "$DIR/up.json" "v.automerge_repo[0]")
WS_B=$(field "$DIR/up.json" "v.automerge_repo[1]")
export ASPEN_CLUSTER=$(cat "$DIR/cluster.ticket") ASPEN_IDENTITY="$DIR/admin.key" ASPEN_NO_DHT=true
# What the pages may do: read and write documents automerge/*, for 12 hours.
TOKEN=$("$ASPEN" auth token issue --bearer --allow doc:write:automerge/ --ttl 12h)

echo "building the page..."
cd "$ROOT/examples/shared-list"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  # (npm install --no-save, not npm ci: see node/tests/integration/automerge_repo.rs)
  npm install --no-save --no-audit --no-fund --loglevel=error
fi
npm run -s build
node serve.mjs 0 > "$DIR/serve.out" &
SERVER=$!
for _ in $(seq 100); do
  [ -s "$DIR/serve.out" ] && break
  sleep 0.1
done
PAGE=$(head -1 "$DIR/serve.out")

if [ "${1:-}" = "--check" ]; then
  "$ROOT/scripts/install-chromium.sh" > /dev/null
  SHOTS=${SCREENSHOT_DIR:-$ROOT/target}
  mkdir -p "$SHOTS"
  RESULT=$(node browser-test.mjs "$PAGE" "$WS_A" "$WS_B" "$TOKEN" "$SHOTS/shared-list.png")
  echo "$RESULT"
  echo "screenshots: $SHOTS/shared-list-a.png $SHOTS/shared-list-b.png"
  echo "$RESULT" | grep -q '"ok":true' || exit 1
  echo "shared-list: OK"
  exit 0
fi

# One list for both links: created here, named as automerge-repo names documents.
DOC=$(node -e "import('@automerge/automerge-repo/slim').then(m => console.log(m.generateAutomergeUrl()))")
"$ASPEN" doc create "automerge/${DOC#automerge:}" --json '{"items": []}' > /dev/null
link() {
  node -e "const u = new URL('$PAGE'); u.searchParams.set('ws', '$1'); \
    u.searchParams.set('token', process.argv[1]); u.searchParams.set('doc', '$DOC'); console.log(u.href)" "$TOKEN"
}
echo
echo "Open the list through member 1:  $(link "$WS_A")"
echo "and through member 2:            $(link "$WS_B")"
echo
echo "Edits in one appear in the other (and \`aspen doc get automerge/${DOC#automerge:}\` shows them)."
echo "Ctrl-C stops the cluster and the page server."
wait "$SERVER"
