#!/usr/bin/env python3
"""Extract BGP PDUs from a pcap (Ethernet/IPv4/TCP, as `tcpdump -i lo -w` writes it).

Usage: extract_bgp.py interop.pcap > interop.txt
Output: one line per BGP message, `src_ip:port>dst_ip:port type hex`, in capture order per
TCP stream (streams ordered by their first packet). Retransmitted bytes are dropped by
tracking the next expected sequence number of each direction.
"""
import struct
import sys


def packets(path):
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    off = 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[off:off + 16])
        off += 16
        yield data[off:off + incl]
        off += incl


def main():
    streams = {}  # (src, dst) -> [next_seq, bytearray]
    order = []
    for frame in packets(sys.argv[1]):
        if len(frame) < 14 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack(">H", ip[2:4])[0]
        src = ".".join(map(str, ip[12:16]))
        dst = ".".join(map(str, ip[16:20]))
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        doff = (tcp[12] >> 4) * 4
        flags = tcp[13]
        payload = tcp[doff:]
        key = (f"{src}:{sport}", f"{dst}:{dport}")
        if flags & 0x02:  # SYN: new stream (a reconnect reuses no key, ports differ)
            streams[key] = [seq + 1, bytearray()]
            order.append(key)
            continue
        st = streams.get(key)
        if st is None or not payload:
            continue
        if seq == st[0]:
            st[1] += payload
            st[0] = (seq + len(payload)) & 0xFFFFFFFF
    for key in order:
        buf = streams[key][1]
        i = 0
        while i + 19 <= len(buf):
            n = struct.unpack(">H", buf[i + 16:i + 18])[0]
            if n < 19 or i + n > len(buf):
                break
            print(f"{key[0]}>{key[1]} {buf[i + 18]} {bytes(buf[i:i + n]).hex()}")
            i += n


if __name__ == "__main__":
    main()
