"""Draws the benchmark's throughput and latency from results.json (written by benches/daemon.rs)."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
r = json.load(open(src))

fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.8))

pc = r["pipeline_ceiling"]
a.bar(["bare rdkafka\nconsume", "pipeline,\nno-op handlers"],
      [pc["median_bare_per_s"], pc["median_pipeline_per_s"]], color=["#999999", "#1f77b4"])
a.set_title(f"Pipeline ceiling ({pc['records']} records)\nratio {pc['ratio']:.2f}")
a.set_ylabel("events/s (median)")

m = r["with_mongodb"]
b.bar(["server's own\nrate, same writes", "pipeline,\nshipped handlers", "per-event\ndesign"],
      [m["median_server_ceiling_per_s"], m["median_pipeline_per_s"], m["median_per_event_per_s"]],
      color=["#999999", "#1f77b4", "#d62728"])
b.set_title(f"With MongoDB ({m['records']} records)\n"
            f"{m['ratio_to_ceiling']:.2f} of the server, {m['ratio_to_per_event']:.1f}x per-event")
b.set_ylabel("events/s (median)")

lat = r["latency"]
names = list(lat.keys())
labels = [n.replace("_per_s", "/s").replace("_", " ") for n in names]
x = range(len(names))
w = 0.27
for i, (p, color) in enumerate([("p50_ms", "#2ca02c"), ("p99_ms", "#ff7f0e"), ("p999_ms", "#9467bd")]):
    c.bar([j + (i - 1) * w for j in x], [lat[n][p] for n in names], w, label=p.replace("_ms", ""), color=color)
c.set_xticks(list(x))
c.set_xticklabels(labels)
c.set_yscale("log")
c.set_ylabel("ms to MongoDB acknowledgement (median of runs)")
c.set_title("Latency")
c.legend()

machine = r.get("machine", {})
fig.suptitle(f"event-processor benchmark: {machine.get('cores', '?')} cores, {machine.get('cpu', '')}")
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"wrote {out}")
