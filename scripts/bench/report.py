#!/usr/bin/env python3
"""Turns the raw records of scripts/bench/run.sh into the report.

  report.py META_JSON RAW_JSONL OUT_DIR

Prints the human table, and writes OUT_DIR/latest.json (the previous
latest.json is compared against, then kept as OUT_DIR/<date>.json too),
OUT_DIR/latest.txt (the table) and OUT_DIR/latest.md (Markdown tables for
docs/BENCHMARKS.md).
"""
import json
import os
import statistics
import sys

PEERS = ["gocryptfs", "securefs"]
FSES = ["plain", "gocryptfs", "securefs", "kmsfs", "kmsfs-shared"]

# key, label, unit, better, target, error keys that void the figure
ROWS = [
    ("seqwrite_mbs", "seq write 1M + fsync", "MB/s", "higher", ("peer>=", 1.3, "plain>=", 0.75), ["seqwrite", "seq_setup"]),
    ("seqread_cold_mbs", "seq read 1M, cold", "MB/s", "higher", ("peer>=", 1.3, "plain>=", 0.75), ["seqread", "seq_setup"]),
    ("randread_cold_iops", "4K rand read, cold", "IOPS", "higher", ("peer>=", 1.2), ["randread", "seq_setup"]),
    ("untar_s", "untar (tar xf)", "s", "lower", ("peer<=", 0.8), ["untar", "kernel_setup"]),
    ("md5sum_s", "md5sum -c", "s", "lower", ("peer<=", 0.8), ["md5sum", "untar", "kernel_setup"]),
    ("ls_lR_s", "ls -lR", "s", "lower", ("peer<=", 0.8), ["ls_lR", "untar", "kernel_setup"]),
    ("rm_rf_s", "rm -rf", "s", "lower", ("peer<=", 0.8), ["rm_rf", "untar", "kernel_setup"]),
    ("ml_cold_files_s", "ML read cold", "files/s", "higher", None, ["ml_cold", "ml_create", "ml_setup"]),
    ("ml_cold_mbs", "ML read cold", "MB/s", "higher", None, ["ml_cold", "ml_create", "ml_setup"]),
    ("ml_warm_files_s", "ML read warm", "files/s", "higher", None, ["ml_warm", "ml_create", "ml_setup"]),
    ("ml_warm_mbs", "ML read warm", "MB/s", "higher", None, ["ml_warm", "ml_create", "ml_setup"]),
    ("ml_cold_kms_unwraps", "KMS unwraps sent, ML cold", "req", "lower", None, ["ml_cold_kms", "ml_cold", "ml_create", "ml_setup"]),
    ("ml_warm_kms_unwraps", "KMS unwraps sent, ML warm", "req", "lower", ("zero",), ["ml_warm_kms", "ml_warm", "ml_create", "ml_setup"]),
    ("rss_after_untar_mib", "kmsfs RSS after untar", "MiB", "lower", None, ["rss_after_untar", "untar", "kernel_setup"]),
    ("hwm_after_untar_mib", "kmsfs peak RSS (untar)", "MiB", "lower", None, ["rss_after_untar", "untar", "kernel_setup"]),
    ("rss_after_ml_mib", "kmsfs RSS after ML", "MiB", "lower", None, ["rss_after_ml", "ml_setup"]),
    ("hwm_after_ml_mib", "kmsfs peak RSS (ML)", "MiB", "lower", None, ["rss_after_ml", "ml_setup"]),
]

# Figures only the Vault table shows, in the columns of ROWS (its targets are
# set in the Vault table). "sent" counts are what the daemon sent (its
# metrics); "server saw" counts are what the OpenBao server handled (its
# telemetry); the server's CPU time comes out of the same two cores.
VAULT_ONLY_ROWS = [
    ("ml_cold_server_requests", "requests server saw, ML cold", "req", "lower", None, ["ml_cold_server", "ml_cold", "ml_create", "ml_setup"]),
    ("ml_warm_server_requests", "requests server saw, ML warm", "req", "lower", None, ["ml_warm_server", "ml_warm", "ml_create", "ml_setup"]),
    ("ml_create_kms_requests", "KMS requests sent, creating", "req", "lower", None, ["ml_create_kms", "ml_create", "ml_setup"]),
    ("ml_create_server_requests", "requests server saw, creating", "req", "lower", None, ["ml_create_server", "ml_create", "ml_setup"]),
    ("ml_cold_daemon_cpu_s", "kmsfs CPU, ML cold", "s", "lower", None, ["ml_cold_daemon_cpu", "ml_cold", "ml_create", "ml_setup"]),
    ("ml_cold_server_cpu_s", "KMS server CPU, ML cold", "s", "lower", None, ["ml_cold_server", "ml_cold", "ml_create", "ml_setup"]),
]

# The Vault table's figures, in order (kmsfs local next to kmsfs vault).
VAULT_KEYS = [
    "ml_cold_files_s", "ml_cold_mbs", "ml_warm_files_s", "ml_warm_mbs",
    "ml_cold_kms_unwraps", "ml_warm_kms_unwraps", "ml_cold_server_requests", "ml_warm_server_requests",
    "ml_create_kms_requests", "ml_create_server_requests", "ml_cold_daemon_cpu_s", "ml_cold_server_cpu_s",
    "rss_after_ml_mib",
]


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if float(v).is_integer() and abs(v) >= 100:
        return "%d" % v
    if abs(v) >= 1000:
        return "%.0f" % v
    if abs(v) >= 100:
        return "%.1f" % v
    if abs(v) >= 10:
        return "%.2f" % v
    return "%.3g" % v


def ratio_s(r):
    return "-" if r is None else "%.2fx" % r


def load(meta_path, raw_path):
    meta = json.load(open(meta_path))
    values, units, errors, unavailable, extras = {}, {}, [], [], {}
    for line in open(raw_path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        if "error" in r:
            errors.append(r)
        elif "unavailable" in r:
            unavailable.append(r)
        else:
            key = (r["fs"], r["metric"])
            values.setdefault(key, []).append(r["value"])
            units[key] = r["unit"]
            extras.setdefault(key, []).append({k: v for k, v in r.items() if k not in ("fs", "metric", "value", "unit")})
    return meta, values, units, errors, unavailable, extras


def main(meta_path, raw_path, out_dir):
    meta, values, units, errors, unavailable, extras = load(meta_path, raw_path)
    med = {k: statistics.median(v) for k, v in values.items()}

    def err_for(fs, keys):
        for e in errors:
            if e["fs"] == fs and e["metric"] in keys:
                return e
        return None

    def na_for(fs):
        for u in unavailable:
            if u["fs"] == fs:
                return u
        return None

    def cell(fs, key, errkeys):
        e = err_for(fs, errkeys)
        if e:
            return "FAILED" if "md5" in e["metric"] else "ERROR"
        if (fs, key) in med:
            return med[(fs, key)]
        return None

    quick = meta.get("quick")
    lines = []
    md = []
    title = "kmsfs benchmark%s — %s" % (" [QUICK: smoke-test sizes, NOT comparable]" if quick else "", meta["date"])
    lines.append(title)
    m = meta["machine"]
    v = meta["versions"]
    s = meta["sizes"]
    machine = "%s; %d cores, %.1f GiB RAM; kernel %s; %s; disk %s; load avg start %s, end %s" % (
        m["cpu"], m["nproc"], m["mem_total_kib"] / 1048576, m["kernel"], m["os"], m["disk"], m["loadavg_start"], m["loadavg_end"])
    versions = "kmsfs %s; gocryptfs %s; securefs %s; %s" % (v["kmsfs"], v["gocryptfs"].split(";")[0], v["securefs"], v["fio"])
    sizes = "seq file %d MiB; 4K random read %d s; ML %d files x %d KiB, %d readers; kernel tree %s (%s entries); median of %d rep(s)" % (
        s["seq_mib"], s["randread_seconds"], s["ml_files"], s["ml_file_bytes"] // 1024, s["ml_readers"], s["kernel_set"],
        s["kernel_entries"] if s["kernel_entries"] is not None else "n/a", meta["reps"])
    lines += ["machine: " + machine, "versions: " + versions, "sizes: " + sizes, ""]

    fses = [f for f in FSES if f in meta["fs"].split(",")]
    has_kms = "kmsfs" in fses
    header = ["figure", "unit"] + fses
    if has_kms:
        header += ["kmsfs/" + f for f in fses if f != "kmsfs"] + ["target (kmsfs)", "met?"]
    table = []
    results_rows = []
    for key, label, unit, better, target, errkeys in ROWS:
        cells = {f: cell(f, key, errkeys) for f in fses}
        if all(c is None for c in cells.values()):
            continue
        row = [label, unit + (" ↑" if better == "higher" else " ↓")] + [fmt(cells[f]) for f in fses]
        ratios = {}
        k = cells.get("kmsfs")
        for f in fses:
            if f == "kmsfs":
                continue
            p = cells[f]
            if isinstance(k, (int, float)) and isinstance(p, (int, float)) and p:
                ratios[f] = k / p
            else:
                ratios[f] = None
        tgt_s, met = "", None
        if target and has_kms:
            peers = [(f, cells[f]) for f in PEERS if isinstance(cells.get(f), (int, float))]
            if target[0] == "zero":
                tgt_s = "= 0"
                if isinstance(k, (int, float)):
                    met = k == 0
            else:
                parts, oks = [], []
                if peers:
                    best = max(peers, key=lambda x: x[1]) if better == "higher" else min(peers, key=lambda x: x[1])
                    r = k / best[1] if isinstance(k, (int, float)) and best[1] else None
                    op = target[0][-2:]
                    parts.append("%s%.2fx %s (%s)" % ("≥" if op == ">=" else "≤", target[1], best[0], ratio_s(r)))
                    if r is not None:
                        oks.append(r >= target[1] if op == ">=" else r <= target[1])
                    else:
                        oks.append(False)
                else:
                    parts.append("peer n/a")
                if len(target) > 2:
                    p = cells.get("plain")
                    r = k / p if isinstance(k, (int, float)) and isinstance(p, (int, float)) and p else None
                    parts.append("≥%.2fx plain (%s)" % (target[3], ratio_s(r)))
                    if r is not None:
                        oks.append(r >= target[3])
                tgt_s = "; ".join(parts)
                if isinstance(k, (int, float)) and oks:
                    met = all(oks)
                elif isinstance(k, str):
                    met = False
        if has_kms:
            row += [ratio_s(ratios[f]) for f in fses if f != "kmsfs"]
            row += [tgt_s, "" if not tgt_s else ("yes" if met else ("NO" if met is False else "?"))]
        table.append(row)
        results_rows.append({"metric": key, "label": label, "unit": unit, "better": better,
                             "values": {f: cells[f] for f in fses},
                             "kmsfs_ratio": {f: ratios.get(f) for f in fses if f != "kmsfs"},
                             "target": tgt_s or None, "met": met})

    def render(header, rows):
        w = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        n = len(header)
        tail = 2 if header[-1] == "met?" else 0

        def just(i, c):
            if i < 2 or i >= n - tail:
                return str(c).ljust(w[i])
            return str(c).rjust(w[i])
        out = ["  ".join(just(i, c) for i, c in enumerate(r)).rstrip() for r in [header] + rows]
        out.insert(1, "  ".join("-" * x for x in w))
        return out

    def render_md(header, rows):
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        return out

    if table:
        lines += render(header, table)
        lines.append("↑ higher is better (throughput: ratio kmsfs/peer > 1 means kmsfs is faster); "
                     "↓ lower is better (times: ratio kmsfs_time/peer_time < 1 means kmsfs is faster).")
        lines.append("Cold = after unmount, sync + drop_caches, remount (a fresh daemon: empty DEK cache). "
                     "4K random reads start cold; fio goes round the file again until the time is up, and FUSE filesystems then read from the backing page cache (fio drops only the mount's). ML warm = the second pass right after the cold one.")
        md += render_md(header, table)

    # Vault
    vault = {}
    vrows = []
    vna = na_for("kmsfs-vault")
    if vna or any(f == "kmsfs-vault" for f, _ in values) or any(e["fs"] == "kmsfs-vault" for e in errors):
        lines += ["", "kmsfs with a Vault policy (dev OpenBao transit on loopback) vs kmsfs local, ML-style read:"]
        md += ["", "**kmsfs with a Vault policy (dev OpenBao) vs kmsfs local, ML-style read**", ""]
        if vna:
            lines.append("  Vault: unavailable — " + vna["unavailable"])
            md.append("Vault: unavailable — " + vna["unavailable"])
            vault["unavailable"] = vna["unavailable"]
        else:
            vh = ["figure", "unit", "kmsfs local", "kmsfs vault", "vault/local", "target", "met?"]
            nfiles = s["ml_files"]
            by_key = {row[0]: row for row in ROWS + VAULT_ONLY_ROWS}
            for key in VAULT_KEYS:
                _, label, unit, better, _, errkeys = by_key[key]
                lc = cell("kmsfs", key, errkeys)
                vc = cell("kmsfs-vault", key, errkeys)
                if lc is None and vc is None:
                    continue
                r = vc / lc if isinstance(vc, (int, float)) and isinstance(lc, (int, float)) and lc else None
                tgt, met = "", None
                if key == "ml_cold_files_s":
                    tgt = "vault ≥0.80x local"
                    met = r is not None and r >= 0.8
                elif key == "ml_cold_server_requests":
                    per = vc / nfiles if isinstance(vc, (int, float)) else None
                    tgt = "vault ≤1 per file (%s/file)" % (fmt(per) if per is not None else "?")
                    met = per is not None and per <= 1
                elif key == "ml_warm_kms_unwraps":
                    tgt = "= 0 (both)"
                    met = vc == 0 and lc == 0
                elif key == "ml_warm_server_requests":
                    tgt = "= 0"
                    met = vc == 0
                vrows.append([label, unit + (" ↑" if better == "higher" else " ↓"), fmt(lc), fmt(vc), ratio_s(r), tgt,
                              "" if not tgt else ("yes" if met else "NO")])
                vault[key] = {"local": lc, "vault": vc, "vault_over_local": r, "target": tgt or None, "met": met if tgt else None}
            lines += render(vh, vrows)
            md += render_md(vh, vrows)

    problems = [e for e in errors] + [u for u in unavailable if u["fs"] != "kmsfs-vault"]
    if problems:
        lines += ["", "Errors / failures:"]
        md += ["", "Errors / failures:", ""]
        for e in problems:
            t = "  - %s %s: %s" % (e["fs"], e["metric"], e.get("error") or e.get("unavailable"))
            lines.append(t)
            md.append(t.strip())

    # compare with the previous run
    prev_path = os.path.join(out_dir, "latest.json")
    prev = None
    if os.path.exists(prev_path):
        try:
            prev = json.load(open(prev_path))
        except Exception:
            prev = None
    comp = []
    if prev and prev.get("quick") == quick:
        pf = prev.get("figures", {}).get("kmsfs", {})
        for key, label, unit, better, *_ in ROWS:
            now = med.get(("kmsfs", key))
            old = pf.get(key, {}).get("median") if isinstance(pf.get(key), dict) else None
            if isinstance(now, (int, float)) and isinstance(old, (int, float)) and old:
                comp.append("  %-24s %10s -> %10s %-8s (%+.0f%%)" % (label, fmt(old), fmt(now), unit, (now / old - 1) * 100))
        if comp:
            lines += ["", "kmsfs vs the previous run in %s (%s):" % (out_dir, prev.get("date"))] + comp

    text = "\n".join(lines) + "\n"
    sys.stdout.write("\n" + text)

    figures = {}
    for (fs, key), vals in values.items():
        figures.setdefault(fs, {})[key] = {"median": med[(fs, key)], "values": vals, "unit": units[(fs, key)],
                                           "extra": extras[(fs, key)]}
    result = dict(meta)
    result.update({"figures": figures, "table": results_rows, "vault": vault, "errors": errors,
                   "unavailable": unavailable, "text": text})
    os.makedirs(out_dir, exist_ok=True)
    tmp = prev_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    os.replace(tmp, prev_path)
    dated = os.path.join(out_dir, "%s%s.json" % (meta["date"].replace(":", ""), "-quick" if quick else ""))
    with open(dated, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, "latest.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "latest.md"), "w") as f:
        f.write("\n".join([title, "", "- machine: " + machine, "- versions: " + versions, "- sizes: " + sizes, ""] + md) + "\n")
    print("results: %s (also %s, latest.txt, latest.md)" % (prev_path, dated))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.stderr.write(__doc__)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
