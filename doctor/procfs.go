package doctor

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// proc is a process as /proc shows it to anyone: status and cmdline.
type proc struct {
	pid, ppid  int
	name       string // status Name: (the executable's name, at most 15 bytes)
	uid, gid   int    // effective
	groups     []int  // supplementary
	noNewPrivs bool   // NoNewPrivs: 1 (setuid and setgid bits are ignored at exec)
	argv       []string
}

// describe is "pid N (argv)" for messages.
func (p *proc) describe() string {
	cmd := strings.Join(p.argv, " ")
	if cmd == "" {
		cmd = p.name
	}
	if len(cmd) > 120 {
		cmd = cmd[:117] + "..."
	}
	return fmt.Sprintf("pid %d (%s)", p.pid, cmd)
}

// inGroup reports whether the process has gid g, as its group or a
// supplementary one.
func (p *proc) inGroup(g int) bool { return p.gid == g || slices.Contains(p.groups, g) }

// parseStatus reads /proc/<pid>/status.
func parseStatus(text string) (proc, error) {
	var p proc
	seen := 0
	for line := range strings.Lines(text) {
		key, val, ok := strings.Cut(strings.TrimRight(line, "\n"), ":")
		if !ok {
			continue
		}
		f := strings.Fields(val)
		num := func(i int) (int, error) {
			if len(f) <= i {
				return 0, fmt.Errorf("status %s: %q", key, val)
			}
			return strconv.Atoi(f[i])
		}
		var err error
		switch key {
		case "Name":
			p.name = strings.TrimSpace(val)
			seen |= 1
		case "PPid":
			p.ppid, err = num(0)
			seen |= 2
		case "Uid":
			p.uid, err = num(1)
			seen |= 4
		case "Gid":
			p.gid, err = num(1)
			seen |= 8
		case "Groups":
			for _, s := range f {
				g, gerr := strconv.Atoi(s)
				if gerr != nil {
					return proc{}, fmt.Errorf("status Groups: %q", val)
				}
				p.groups = append(p.groups, g)
			}
		case "NoNewPrivs":
			n, nerr := num(0)
			p.noNewPrivs, err = n == 1, nerr
		}
		if err != nil {
			return proc{}, err
		}
	}
	if seen != 15 {
		return proc{}, errors.New("status: Name, PPid, Uid or Gid missing")
	}
	return p, nil
}

// splitCmdline splits /proc/<pid>/cmdline at its NULs.
func splitCmdline(b []byte) []string {
	b = bytes.TrimSuffix(b, []byte{0})
	if len(b) == 0 {
		return nil
	}
	return strings.Split(string(b), "\x00")
}

// listenSock is a listening TCP socket from /proc/net/tcp or tcp6.
type listenSock struct {
	addr  netip.AddrPort
	uid   int // the user that made the socket
	inode uint64
}

// parseNetTCP returns the listening sockets (state 0A) of /proc/net/tcp
// or /proc/net/tcp6; lines it cannot read are skipped.
func parseNetTCP(text string) []listenSock {
	var out []listenSock
	for line := range strings.Lines(text) {
		if s, ok := parseNetTCPLine(line); ok {
			out = append(out, s)
		}
	}
	return out
}

// parseNetTCPLine reads one line: "sl local rem st tx:rx tr:when retr uid
// timeout inode ...", where local is the address as the kernel's words
// in host byte order, in hex, then ":" and the port in hex.
func parseNetTCPLine(line string) (listenSock, bool) {
	f := strings.Fields(line)
	if len(f) < 10 || f[3] != "0A" {
		return listenSock{}, false
	}
	hostHex, portHex, ok := strings.Cut(f[1], ":")
	if !ok {
		return listenSock{}, false
	}
	raw, err := hex.DecodeString(hostHex)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return listenSock{}, false
	}
	// Each 32-bit word was printed as a number: turn it back into the
	// bytes it held in memory, which are the address in network order.
	b := make([]byte, len(raw))
	for i := 0; i < len(raw); i += 4 {
		binary.NativeEndian.PutUint32(b[i:], binary.BigEndian.Uint32(raw[i:]))
	}
	addr, _ := netip.AddrFromSlice(b)
	port, err1 := strconv.ParseUint(portHex, 16, 16)
	uid, err2 := strconv.Atoi(f[7])
	inode, err3 := strconv.ParseUint(f[9], 10, 64)
	if errors.Join(err1, err2, err3) != nil {
		return listenSock{}, false
	}
	return listenSock{addr: netip.AddrPortFrom(addr.Unmap(), uint16(port)), uid: uid, inode: inode}, true
}

// fileLock is one line of /proc/locks.
type fileLock struct {
	pid   int
	inode uint64
}

// parseLocks reads /proc/locks ("1: FLOCK ADVISORY WRITE 1234
// fe:00:5678 0 EOF"); waiters ("1: -> FLOCK ...") are skipped.
func parseLocks(text string) []fileLock {
	var out []fileLock
	for line := range strings.Lines(text) {
		if l, ok := parseLockLine(line); ok {
			out = append(out, l)
		}
	}
	return out
}

func parseLockLine(line string) (fileLock, bool) {
	f := strings.Fields(line)
	if len(f) < 6 || f[1] == "->" {
		return fileLock{}, false
	}
	pid, err := strconv.Atoi(f[4])
	if err != nil {
		return fileLock{}, false
	}
	dev := strings.Split(f[5], ":")
	if len(dev) != 3 {
		return fileLock{}, false
	}
	_, err1 := strconv.ParseUint(dev[0], 16, 32)
	_, err2 := strconv.ParseUint(dev[1], 16, 32)
	ino, err3 := strconv.ParseUint(dev[2], 10, 64)
	if errors.Join(err1, err2, err3) != nil {
		return fileLock{}, false
	}
	return fileLock{pid: pid, inode: ino}, true
}

// procTable reads /proc on demand and keeps what it read: the doctor's
// view of the machine is taken once.
type procTable struct {
	root    string
	byPID   map[int]*proc
	scanned bool // every process has been read

	listen          []listenSock   // nil until read
	sockets         map[uint64]int // socket inode -> pid holding it
	socketsComplete bool           // every process's descriptors were readable
	socketsRead     bool
}

func newProcTable(root string) *procTable {
	return &procTable{root: root, byPID: map[int]*proc{}}
}

// get reads one process; nil when it does not exist (or went away).
func (t *procTable) get(pid int) *proc {
	if p, ok := t.byPID[pid]; ok {
		return p
	}
	dir := filepath.Join(t.root, strconv.Itoa(pid))
	st, err := os.ReadFile(filepath.Join(dir, "status"))
	if err != nil {
		t.byPID[pid] = nil
		return nil
	}
	p, err := parseStatus(string(st))
	if err != nil {
		t.byPID[pid] = nil
		return nil
	}
	p.pid = pid
	if cl, err := os.ReadFile(filepath.Join(dir, "cmdline")); err == nil {
		p.argv = splitCmdline(cl)
	}
	t.byPID[pid] = &p
	return &p
}

// all returns every process, by pid.
func (t *procTable) all() []*proc {
	if !t.scanned {
		ents, _ := os.ReadDir(t.root)
		for _, e := range ents {
			if pid, err := strconv.Atoi(e.Name()); err == nil {
				t.get(pid)
			}
		}
		t.scanned = true
	}
	var out []*proc
	for _, p := range t.byPID {
		if p != nil {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b *proc) int { return a.pid - b.pid })
	return out
}

// children returns pid's child processes.
func (t *procTable) children(pid int) []*proc {
	var out []*proc
	for _, p := range t.all() {
		if p.ppid == pid {
			out = append(out, p)
		}
	}
	return out
}

// socketOwner returns the process holding a socket inode. ok is false
// when no readable process holds it; complete says whether every
// process's descriptors could be read (only root can read other users').
func (t *procTable) socketOwner(inode uint64) (pid int, ok, complete bool) {
	if !t.socketsRead {
		t.readSockets()
	}
	pid, ok = t.sockets[inode]
	return pid, ok, t.socketsComplete
}

func (t *procTable) readSockets() {
	t.socketsRead, t.socketsComplete = true, true
	t.sockets = map[uint64]int{}
	ents, _ := os.ReadDir(t.root)
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fdDir := filepath.Join(t.root, e.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			if errors.Is(err, os.ErrPermission) {
				t.socketsComplete = false
			}
			continue
		}
		for _, fd := range fds {
			link, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
			if err != nil {
				continue
			}
			if s, ok := strings.CutPrefix(link, "socket:["); ok {
				if ino, err := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64); err == nil {
					if _, seen := t.sockets[ino]; !seen {
						t.sockets[ino] = pid
					}
				}
			}
		}
	}
}

// listening returns every listening TCP socket, IPv4 and IPv6. Read once:
// with many connections open or closing, /proc/net/tcp takes a while.
func (t *procTable) listening() []listenSock {
	if t.listen == nil {
		t.listen = []listenSock{}
		for _, f := range []string{"net/tcp", "net/tcp6"} {
			if b, err := os.ReadFile(filepath.Join(t.root, f)); err == nil {
				t.listen = append(t.listen, parseNetTCP(string(b))...)
			}
		}
	}
	return t.listen
}

// locks returns /proc/locks.
func (t *procTable) locks() []fileLock {
	b, err := os.ReadFile(filepath.Join(t.root, "locks"))
	if err != nil {
		return nil
	}
	return parseLocks(string(b))
}

// link reads /proc/<pid>/<name> (cwd, exe): root only for other users'
// processes.
func (t *procTable) link(pid int, name string) (string, error) {
	return os.Readlink(filepath.Join(t.root, strconv.Itoa(pid), name))
}

// unit returns the systemd unit a process runs in ("relay.service"), or
// "" when it is not in one.
func (t *procTable) unit(pid int) string {
	b, err := os.ReadFile(filepath.Join(t.root, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return ""
	}
	for line := range strings.Lines(string(b)) {
		f := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(f) != 3 {
			continue
		}
		path := f[2]
		for _, part := range slices.Backward(strings.Split(path, "/")) {
			if strings.HasSuffix(part, ".service") {
				return part
			}
		}
	}
	return ""
}
