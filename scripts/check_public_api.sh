#!/usr/bin/env bash
# Lists the public types of src/LoraKit that have no XML doc comment (issue 17: every public type documented).
#   scripts/check_public_api.sh            print "undocumented public types: N of M" and the list, grouped by folder
#   scripts/check_public_api.sh --check    the same, and exit 1 when any is undocumented (for CI once the sweep is done)
# How: the library is compiled in a configuration of its own (ApiCheck: bin/ and obj/ stay apart from Release) with
# documentation on; the compiler's CS1591 warnings ("missing XML comment for publicly visible type or member") name the
# symbol and its declaration line, and a warning is about a type when that line declares it (class, record, struct,
# interface, enum, delegate). Members without docs are not listed: the sweep is about types first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
dotnet build "$root/src/LoraKit/LoraKit.csproj" -c ApiCheck --nologo --no-incremental -p:GenerateDocumentationFile=true \
  -p:TreatWarningsAsErrors=false -p:WarningLevel=4 -clp:NoSummary -v:q >"$log" 2>&1 || { cat "$log"; exit 2; }
python3 - "$log" "$root" "${1:-}" <<'PY'
import re, sys, collections
log, root, mode = sys.argv[1], sys.argv[2], sys.argv[3]
warn = re.compile(r"^(?P<file>/[^(]+)\((?P<line>\d+),\d+\): warning CS1591: .*'(?P<sym>[^']+)'")
# the name right after the keyword (a delegate: after its return type); enum members and primary constructors, which
# share their type's line, are not types
decl = r"\b((record\s+)?(class|struct)|record|interface|enum|delegate\s+[\w<>\[\],?. ]+?)\s+{name}\b"
missing = set()
for l in open(log, encoding="utf-8", errors="replace"):
    m = warn.match(l.strip())
    if not m: continue
    sym = m["sym"].split("(")[0]
    parts = re.sub(r"<[^>]*>", "", sym).split(".")
    name = parts[-1]
    if len(parts) > 1 and parts[-2] == name: continue  # a constructor
    src = open(m["file"], encoding="utf-8").read().splitlines()[int(m["line"]) - 1]
    if re.search(decl.format(name=re.escape(name)), src):
        missing.add((m["file"].replace(root + "/", ""), sym))
print(f"undocumented public types: {len(missing)}")
by_folder = collections.defaultdict(list)
for f, sym in sorted(missing):
    by_folder[f.rsplit("/", 1)[0]].append(sym)
for folder, syms in by_folder.items():
    print(f"  {folder}: " + ", ".join(s.replace("LoraKit.", "") for s in syms))
sys.exit(1 if mode == "--check" and missing else 0)
PY
