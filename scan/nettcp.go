package scan

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"net/netip"
	"strconv"
)

// TCP states as the kernel numbers them in /proc/net/tcp (include/net/tcp_states.h).
const (
	stateEstablished = 0x01
	stateSynSent     = 0x02
)

// Socket is one line of /proc/net/tcp or /proc/net/tcp6.
type Socket struct {
	Local  netip.AddrPort `json:"local"`
	Remote netip.AddrPort `json:"remote"`
	State  string         `json:"state"` // "established", "syn-sent", or the kernel's hex code
	UID    int            `json:"uid"`   // owner of the socket (its creator's effective uid)
	Inode  uint64         `json:"inode"`
}

// Open reports whether the socket is a connection up or on its way up:
// ESTABLISHED, or SYN_SENT (the kernel is still trying to connect).
func (s *Socket) Open() bool { return s.State == "established" || s.State == "syn-sent" }

func stateName(st uint64) string {
	switch st {
	case stateEstablished:
		return "established"
	case stateSynSent:
		return "syn-sent"
	}
	return strconv.FormatUint(st, 16)
}

// ParseNetTCP reads the text of /proc/net/tcp or /proc/net/tcp6 (the
// format is in the kernel's Documentation/networking/proc_net_tcp.rst):
//
//	sl  local_address rem_address   st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode …
//	0: 0100007F:0019 0100007F:A3C2 01 00000000:00000000 00:00000000 00000000 1001 0 123456 …
//
// Addresses are the raw 32-bit words of the address printed as hex numbers
// in the machine's byte order (one word for IPv4, four for IPv6); ports are
// plain hex numbers. The header line and lines that do not parse are
// skipped, so a truncated read yields the complete lines only.
func ParseNetTCP(data []byte) []Socket {
	var out []Socket
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 512), 64<<10)
	for sc.Scan() {
		if s, ok := parseTCPLine(sc.Bytes()); ok {
			out = append(out, s)
		}
	}
	return out
}

func parseTCPLine(line []byte) (Socket, bool) {
	f := bytes.Fields(line)
	if len(f) < 10 || !bytes.HasSuffix(f[0], []byte(":")) {
		return Socket{}, false
	}
	local, ok1 := parseHexAddrPort(f[1])
	remote, ok2 := parseHexAddrPort(f[2])
	st, err1 := strconv.ParseUint(string(f[3]), 16, 8)
	uid, err2 := strconv.ParseUint(string(f[7]), 10, 32)
	inode, err3 := strconv.ParseUint(string(f[9]), 10, 64)
	if !ok1 || !ok2 || err1 != nil || err2 != nil || err3 != nil || local.Addr().BitLen() != remote.Addr().BitLen() {
		return Socket{}, false
	}
	return Socket{Local: local, Remote: remote, State: stateName(st), UID: int(uid), Inode: inode}, true
}

// parseHexAddrPort reads "0100007F:0019" (127.0.0.1:25 on a little-endian
// machine) or its 32-hex-digit IPv6 form.
func parseHexAddrPort(b []byte) (netip.AddrPort, bool) {
	addrHex, portHex, ok := bytes.Cut(b, []byte(":"))
	if !ok || len(portHex) != 4 || (len(addrHex) != 8 && len(addrHex) != 32) {
		return netip.AddrPort{}, false
	}
	port, err := strconv.ParseUint(string(portHex), 16, 16)
	if err != nil {
		return netip.AddrPort{}, false
	}
	var raw [16]byte
	n := len(addrHex) / 8
	for i := range n {
		word, err := strconv.ParseUint(string(addrHex[8*i:8*i+8]), 16, 32)
		if err != nil {
			return netip.AddrPort{}, false
		}
		binary.NativeEndian.PutUint32(raw[4*i:], uint32(word))
	}
	var addr netip.Addr
	if n == 1 {
		addr = netip.AddrFrom4([4]byte(raw[:4]))
	} else {
		addr = netip.AddrFrom16(raw)
	}
	return netip.AddrPortFrom(addr, uint16(port)), true
}
