#!/usr/bin/env python3
"""Turns the raw records of scripts/bench/scale.sh into its table.

  scale_report.py META_JSON RAW_JSONL OUT_DIR

Prints the table and writes OUT_DIR/latest.jsonl (the raw records plus the
meta line), OUT_DIR/latest.txt (the table) and OUT_DIR/latest.md (the same
as Markdown, for docs/BENCHMARKS.md).
"""
import json
import os
import sys

KMS_NAMES = {"local": "local keyring", "vault": "Vault (OpenBao)", "aws": "AWS (moto)"}
MODES = ["per-file", "per-file-nopool", "directory"]
MODE_NAMES = {"per-file": "per-file (DEK pool)", "per-file-nopool": "per-file, dek_pool=0", "directory": "directory"}


def num(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if float(v).is_integer():
        return "{:,}".format(int(v))
    return "%.*f" % (digits, v)


def main(meta_path, raw_path, out_dir):
    meta = json.load(open(meta_path))
    vals, errs = {}, {}
    records = []
    for line in open(raw_path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        records.append(r)
        key = (r["kms"], r["mode"])
        if "error" in r:
            errs.setdefault(key, {})[r["field"]] = r["error"]
        else:
            vals.setdefault(key, {})[r["field"]] = r["value"]
    cases = []
    for r in records:
        key = (r["kms"], r["mode"])
        if key not in cases:
            cases.append(key)

    header = ["KMS", "mode", "creates (s)", "vs local keyring", "KMS requests, creates",
              "cold read node A (s)", "node B (s)", "KMS requests node A", "node B", "server, both nodes"]
    rows = []
    for kms, mode in cases:
        v = vals.get((kms, mode), {})
        e = errs.get((kms, mode), {})

        def cell(field, err_fields, digits=2):
            for f in err_fields:
                if f in e:
                    return "ERROR"
            return num(v.get(field), digits)

        create = cell("create_s", ["creates"])
        base = vals.get(("local", mode), {}).get("create_s")
        ratio = "-"
        if kms != "local" and base and "create_s" in v:
            ratio = "%.2fx" % (v["create_s"] / base)
        elif kms == "local" and "create_s" in v:
            ratio = "1.00x"
        # The server's count where there is one, else what the daemon sent.
        def requests(server_field, sent_field, err_fields):
            for f in err_fields:
                if f in e:
                    return "ERROR"
            s, d = v.get(server_field), v.get(sent_field)
            if s is not None:
                return num(s) + ("" if d is None else " (sent %s)" % num(d))
            return "-" if d is None else "sent %s" % num(d)

        rows.append([
            KMS_NAMES.get(kms, kms), MODE_NAMES.get(mode, mode), create, ratio,
            requests("create_server", "create_sent", ["creates"]),
            cell("read_a_s", ["creates", "read", "read_a"]), cell("read_b_s", ["creates", "read", "read_b"]),
            requests("read_a_server", "read_a_sent", ["creates", "read", "read_a"]),
            requests("read_b_server", "read_b_sent", ["creates", "read", "read_b"]),
            cell("read_server", ["creates", "read"]) if kms != "local" else "-",
        ])

    where = "two GlusterFS client mounts of one volume" if meta.get("gluster") else "one local backing directory"
    title = "kmsfs scale benchmark%s — %s: %s files of %d bytes; cold read by 2 nodes (-o %s, %d processes each) over %s; %d cores; %s" % (
        " [QUICK]" if meta.get("quick") else "", meta["date"], "{:,}".format(meta["files"]), meta["file_bytes"],
        meta["readers_opts"], meta["procs_per_node"], where, meta["nproc"], meta["kmsfs"])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    txt = [title, ""]
    txt.append("  ".join(h.ljust(widths[i]) for i, h in enumerate(header)))
    for r in rows:
        txt.append("  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)))
    errors = [(k, m, f, msg) for (k, m), d in errs.items() for f, msg in d.items()]
    if errors:
        txt += ["", "errors:"]
        txt += ["  %s / %s / %s: %s" % e for e in errors]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    print("\n".join(txt))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "latest.txt"), "w") as f:
        f.write("\n".join(txt) + "\n")
    with open(os.path.join(out_dir, "latest.md"), "w") as f:
        f.write(title + "\n\n" + "\n".join(md) + "\n")
    with open(os.path.join(out_dir, "latest.jsonl"), "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
