#!/usr/bin/env python3
"""Where inside kml's programs the time goes: a `perf record -e cpu-clock -a` profile
mapped to source lines and to the JIT's instructions.

profile_observer.py splits samples by program and innermost frame; this goes one
level down. The kernel keeps, for each loaded program, its BTF line info (source
file, line and text per instruction) and where each of those lines starts in the
JIT image (`jited_line_info`); both come back through BPF_OBJ_GET_INFO_BY_FD, so
the programs must still be loaded when this runs (run it while the agent runs).
This bpftool (7.1) has no disassembler; with --disasm DIR the JIT images are
written there and the hottest instructions are shown through `objdump`, which
says which load stalls (on this machine's guest, with no PMU, cpu-clock samples
land on the oldest instruction not yet retired: after a cache miss, the one
that waits for it).

    perf record -e cpu-clock -F 20000 -a -o perf.data -- sleep 8   # while kml runs
    bench/profile_lines.py perf.data [--disasm DIR] [--top N] PROG_ID...

PROG_IDs: `bpftool prog show` (kml_raw_rq_insert, kml_raw_rq_issue,
kml_raw_infer, ...). Root only (the bpf syscall).
"""
import argparse
import bisect
import collections
import ctypes
import os
import struct
import subprocess
import sys

SYS_BPF = 321  # x86-64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_BTF_GET_FD_BY_ID = 19

# struct bpf_prog_info (include/uapi/linux/bpf.h), the fields up to prog_tags.
_FIELDS = [
    ("type", 4), ("id", 4), ("tag", 8), ("jited_prog_len", 4), ("xlated_prog_len", 4),
    ("jited_prog_insns", 8), ("xlated_prog_insns", 8), ("load_time", 8),
    ("created_by_uid", 4), ("nr_map_ids", 4), ("map_ids", 8), ("name", 16),
    ("ifindex", 4), ("gpl", 4), ("netns_dev", 8), ("netns_ino", 8),
    ("nr_jited_ksyms", 4), ("nr_jited_func_lens", 4), ("jited_ksyms", 8),
    ("jited_func_lens", 8), ("btf_id", 4), ("func_info_rec_size", 4), ("func_info", 8),
    ("nr_func_info", 4), ("nr_line_info", 4), ("line_info", 8), ("jited_line_info", 8),
    ("nr_jited_line_info", 4), ("line_info_rec_size", 4), ("jited_line_info_rec_size", 4),
    ("nr_prog_tags", 4), ("prog_tags", 8),
]


def _offsets():
    off, out = 0, {}
    for name, size in _FIELDS:
        off += -off % size  # natural alignment
        out[name] = off
        off += size
    return out


OFF = _offsets()
INFO_SIZE = 256
libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, len(attr))
    r = libc.syscall(SYS_BPF, cmd, buf, len(attr))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return r


def fd_by_id(cmd, ident):
    return bpf(cmd, struct.pack("<I", ident).ljust(128, b"\0"))


def obj_info(fd, buf):
    bpf(BPF_OBJ_GET_INFO_BY_FD,
        struct.pack("<IIQ", fd, len(buf), ctypes.addressof(buf)).ljust(128, b"\0"))
    return bytes(buf)


def u32(b, name):
    return struct.unpack_from("<I", b, OFF[name])[0]


class Program:
    """One loaded program: its functions' JIT addresses and images, and its lines."""

    def __init__(self, prog_id):
        self.id = prog_id
        fd = fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id)
        try:
            first = obj_info(fd, (ctypes.c_char * INFO_SIZE)())
            counts = {k: u32(first, k) for k in (
                "jited_prog_len", "nr_jited_ksyms", "nr_jited_func_lens", "nr_line_info",
                "nr_jited_line_info", "line_info_rec_size", "jited_line_info_rec_size", "btf_id")}
            arrays = {
                "jited_prog_insns": ctypes.create_string_buffer(counts["jited_prog_len"]),
                "jited_ksyms": ctypes.create_string_buffer(8 * counts["nr_jited_ksyms"]),
                "jited_func_lens": ctypes.create_string_buffer(4 * counts["nr_jited_func_lens"]),
                "line_info": ctypes.create_string_buffer(
                    counts["nr_line_info"] * counts["line_info_rec_size"]),
                "jited_line_info": ctypes.create_string_buffer(
                    counts["nr_jited_line_info"] * counts["jited_line_info_rec_size"]),
            }
            req = (ctypes.c_char * INFO_SIZE)()
            for k in ("jited_prog_len", "nr_jited_ksyms", "nr_jited_func_lens", "nr_line_info",
                      "nr_jited_line_info", "line_info_rec_size", "jited_line_info_rec_size"):
                struct.pack_into("<I", req, OFF[k], counts[k])
            for k, a in arrays.items():
                struct.pack_into("<Q", req, OFF[k], ctypes.addressof(a))
            obj_info(fd, req)
        finally:
            os.close(fd)
        image = arrays["jited_prog_insns"].raw
        ksyms = struct.unpack(f"<{counts['nr_jited_ksyms']}Q", arrays["jited_ksyms"].raw)
        lens = struct.unpack(f"<{counts['nr_jited_func_lens']}I", arrays["jited_func_lens"].raw)
        # The image is the functions' images one after the other; each runs at its ksym.
        self.functions, at = [], 0
        for addr, n in zip(ksyms, lens or [len(image)]):
            self.functions.append((addr, image[at:at + n]))
            at += n
        strings = btf_strings(counts["btf_id"]) if counts["btf_id"] else b""
        li, jli = arrays["line_info"].raw, arrays["jited_line_info"].raw
        self.lines = []
        for k in range(counts["nr_line_info"]):
            _, file_off, line_off, line_col = struct.unpack_from(
                "<IIII", li, k * counts["line_info_rec_size"])
            addr = struct.unpack_from("<Q", jli, k * counts["jited_line_info_rec_size"])[0]
            self.lines.append((addr, os.path.basename(cstr(strings, file_off)),
                               line_col >> 10, cstr(strings, line_off).strip()))
        self.lines.sort()

    def contains(self, ip):
        return any(a <= ip < a + len(img) for a, img in self.functions)


def cstr(strings, off):
    end = strings.find(b"\0", off)
    return strings[off:end].decode(errors="replace") if off < len(strings) else "?"


def btf_strings(btf_id):
    """The string section of a BTF object (struct btf_header: magic, version, flags,
    hdr_len, type_off, type_len, str_off, str_len)."""
    fd = fd_by_id(BPF_BTF_GET_FD_BY_ID, btf_id)
    try:
        info = (ctypes.c_char * 32)()
        size = struct.unpack_from("<I", obj_info(fd, info), 8)[0]  # btf_size
        blob = ctypes.create_string_buffer(size)
        info = (ctypes.c_char * 32)()
        struct.pack_into("<QI", info, 0, ctypes.addressof(blob), size)
        obj_info(fd, info)
    finally:
        os.close(fd)
    raw = blob.raw
    hdr_len, _, _, str_off, str_len = struct.unpack_from("<IIIII", raw, 4)
    return raw[hdr_len + str_off:hdr_len + str_off + str_len]


def samples(perf_data):
    out = subprocess.run(["perf", "script", "-i", perf_data, "-F", "ip,sym"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("bpf_prog_"):
            yield int(parts[0], 16)


def disassemble(prog, ip, out_dir, context=6):
    for addr, img in prog.functions:
        if not addr <= ip < addr + len(img):
            continue
        path = os.path.join(out_dir, f"prog-{prog.id}-{addr:x}.bin")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(img)
        asm = subprocess.run(
            ["objdump", "-D", "-b", "binary", "-mi386:x86-64", f"--adjust-vma={addr:#x}", path],
            capture_output=True, text=True, check=True).stdout.splitlines()
        at = [k for k, l in enumerate(asm) if l.strip().startswith(f"{ip:x}:")]
        if at:
            return asm[max(0, at[0] - context):at[0] + 1]
    return []


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("perf_data")
    ap.add_argument("prog_ids", nargs="+", type=int)
    ap.add_argument("--top", type=int, default=30, help="lines and instructions to show")
    ap.add_argument("--disasm", metavar="DIR", help="write the JIT images here and show "
                    "the hottest instructions in context (needs objdump)")
    args = ap.parse_args()
    progs = [Program(i) for i in args.prog_ids]
    table = sorted((a, p, f, l, t) for p in progs for a, f, l, t in p.lines)
    starts = [row[0] for row in table]
    by_line, by_ip, per_prog = collections.Counter(), collections.Counter(), collections.Counter()
    for ip in samples(args.perf_data):
        prog = next((p for p in progs if p.contains(ip)), None)
        if prog is None:
            continue
        per_prog[prog.id] += 1
        by_ip[(prog, ip)] += 1
        k = bisect.bisect_right(starts, ip) - 1
        if k >= 0 and table[k][1] is prog:
            _, _, f, l, t = table[k]
            by_line[(prog.id, f, l, t)] += 1
    if not per_prog:
        sys.exit(f"{args.perf_data}: no samples in programs {args.prog_ids}")
    print("samples per program:", ", ".join(f"{p}: {n}" for p, n in per_prog.most_common()))
    print("\n| samples | of its program | program | source line | text |")
    print("| ---: | ---: | --- | --- | --- |")
    for (p, f, l, t), n in by_line.most_common(args.top):
        print(f"| {n} | {100 * n / per_prog[p]:.1f}% | {p} | {f}:{l} | `{t[:90]}` |")
    if args.disasm:
        os.makedirs(args.disasm, exist_ok=True)
        print("\nHottest instructions (the sample's instruction last; the load before it "
              "is usually the one it waited for):")
        for (prog, ip), n in by_ip.most_common(args.top):
            print(f"\n{n} samples ({100 * n / per_prog[prog.id]:.1f}% of {prog.id}) at {ip:#x}")
            for line in disassemble(prog, ip, args.disasm):
                print("   ", line)


if __name__ == "__main__":
    main()
