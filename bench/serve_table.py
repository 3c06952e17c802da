"""Prints the serving benchmark table from bench-serve JSON lines on stdin and saves them (argv[1])."""
import json
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip().startswith("{")]
merged = next(r for r in rows if r["adapters"] == 0)["tokens_per_s"]
print(f"\n{'adapters':>9} {'tok/s':>9} {'x merged':>9} {'peak batch':>11}")
for r in rows:
    print(f"{str(r['adapters'] or 'merged'):>9} {r['tokens_per_s']:>9.0f} {r['tokens_per_s'] / merged:>9.2f} {r['peak_batch']:>11}")
json.dump(rows, open(sys.argv[1], "w"), indent=1)
