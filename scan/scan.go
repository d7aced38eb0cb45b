// Package scan finds who talks SMTP from a machine (usually a web server):
// the processes that hold TCP connections to a remote port 25, read from
// /proc, grouped by uid with the account name, command line and working
// directory, and optionally how many processes run in each home directory.
// It also prints the nftables and iptables rules that keep a web server's
// port-25 traffic on the mail servers. It reads /proc and changes nothing.
package scan

import (
	"bytes"
	"cmp"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Options says what to look for.
type Options struct {
	Proc       string            // the proc file system; default /proc
	Port       uint16            // remote port; default 25
	HomePrefix string            // when set, count processes per directory under it (/home -> /home/alice)
	Accounts   map[uint32]string // uid -> account name
}

// Conn is one connection of a process.
type Conn struct {
	Local  string `json:"local"`
	Remote string `json:"remote"`
	State  string `json:"state"`
}

// Process is one process holding connections to the port.
type Process struct {
	PID     int      `json:"pid"`
	UID     int      `json:"uid"` // real uid (Uid: in /proc/PID/status)
	Account string   `json:"account,omitempty"`
	Cmdline []string `json:"cmdline"`
	Cwd     string   `json:"cwd"`
	Conns   []Conn   `json:"connections"`
}

// UIDGroup is the processes of one uid.
type UIDGroup struct {
	UID       int       `json:"uid"`
	Account   string    `json:"account,omitempty"`
	Processes []Process `json:"processes"`
	Conns     int       `json:"connections"`
}

// HomeCount is how many processes have their working directory under one
// home directory, and how many of those hold connections to the port.
type HomeCount struct {
	Home      string `json:"home"`
	Processes int    `json:"processes"`
	SMTP      int    `json:"smtp"`
}

// Report is what Scan found.
type Report struct {
	Port  uint16     `json:"port"`
	ByUID []UIDGroup `json:"by_uid"`
	// Unowned are connections no process could be found for: the process
	// exited meanwhile, or its /proc/PID/fd could not be read (not root).
	Unowned []Socket    `json:"unowned"`
	Homes   []HomeCount `json:"homes,omitempty"`
	// Unreadable counts processes whose fd directory could not be read.
	Unreadable int `json:"unreadable"`
}

// Found reports whether any connection to the port was seen.
func (r *Report) Found() bool { return len(r.ByUID) > 0 || len(r.Unowned) > 0 }

// Scan reads /proc once. Processes that exit while it reads are skipped.
// The error is about /proc as a whole (no net/tcp there).
func Scan(opts Options) (Report, error) {
	proc := cmp.Or(opts.Proc, "/proc")
	port := cmp.Or(opts.Port, 25)
	rep := Report{Port: port, ByUID: []UIDGroup{}, Unowned: []Socket{}}

	sockets := make(map[uint64]Socket)
	for _, name := range []string{"tcp", "tcp6"} {
		data, err := os.ReadFile(filepath.Join(proc, "net", name))
		if err != nil {
			if name == "tcp6" && errors.Is(err, fs.ErrNotExist) {
				continue // IPv6 disabled
			}
			return rep, err
		}
		for _, s := range ParseNetTCP(data) {
			if s.Open() && s.Remote.Port() == port && s.Inode != 0 {
				sockets[s.Inode] = s
			}
		}
	}
	home := strings.TrimRight(filepath.Clean(opts.HomePrefix), "/")
	if len(sockets) == 0 && opts.HomePrefix == "" {
		return rep, nil
	}

	pids, err := readPIDs(proc)
	if err != nil {
		return rep, err
	}
	owned := make(map[uint64]bool)
	groups := make(map[int]*UIDGroup)
	homes := make(map[string]*HomeCount)
	for _, pid := range pids {
		dir := filepath.Join(proc, strconv.Itoa(pid))
		var conns []Conn
		if len(sockets) > 0 {
			inodes, err := socketInodes(filepath.Join(dir, "fd"))
			if err != nil {
				if errors.Is(err, fs.ErrPermission) {
					rep.Unreadable++
				}
				continue // gone, or not ours to read
			}
			for _, ino := range inodes {
				if s, ok := sockets[ino]; ok {
					owned[ino] = true
					conns = append(conns, Conn{Local: unmap(s.Local), Remote: unmap(s.Remote), State: s.State})
				}
			}
		}
		var cwd string
		if len(conns) > 0 || opts.HomePrefix != "" {
			cwd, _ = os.Readlink(filepath.Join(dir, "cwd"))
		}
		if opts.HomePrefix != "" {
			if h, ok := homeOf(home, cwd); ok {
				hc := homes[h]
				if hc == nil {
					hc = &HomeCount{Home: h}
					homes[h] = hc
				}
				hc.Processes++
				if len(conns) > 0 {
					hc.SMTP++
				}
			}
		}
		if len(conns) == 0 {
			continue
		}
		uid, err := realUID(filepath.Join(dir, "status"))
		if err != nil {
			continue // exited
		}
		p := Process{PID: pid, UID: uid, Account: opts.Accounts[uint32(uid)], Cmdline: readCmdline(filepath.Join(dir, "cmdline")), Cwd: cwd, Conns: conns}
		g := groups[uid]
		if g == nil {
			g = &UIDGroup{UID: uid, Account: p.Account}
			groups[uid] = g
		}
		g.Processes = append(g.Processes, p)
		g.Conns += len(conns)
	}

	for _, g := range groups {
		rep.ByUID = append(rep.ByUID, *g)
	}
	slices.SortFunc(rep.ByUID, func(a, b UIDGroup) int { return cmp.Compare(a.UID, b.UID) })
	for ino, s := range sockets {
		if !owned[ino] {
			rep.Unowned = append(rep.Unowned, s)
		}
	}
	slices.SortFunc(rep.Unowned, func(a, b Socket) int {
		return cmp.Or(cmp.Compare(a.UID, b.UID), cmp.Compare(a.Inode, b.Inode))
	})
	for _, h := range homes {
		rep.Homes = append(rep.Homes, *h)
	}
	slices.SortFunc(rep.Homes, func(a, b HomeCount) int {
		return cmp.Or(cmp.Compare(b.SMTP, a.SMTP), cmp.Compare(b.Processes, a.Processes), cmp.Compare(a.Home, b.Home))
	})
	return rep, nil
}

// unmap shows an IPv4-mapped IPv6 address (an IPv4 peer of an IPv6 socket)
// as the IPv4 address it is.
func unmap(ap netip.AddrPort) string {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
}

// readPIDs lists the process directories of proc, in pid order.
func readPIDs(proc string) ([]int, error) {
	f, err := os.Open(proc)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, n := range names {
		if pid, err := strconv.Atoi(n); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	return pids, nil
}

// socketInodes reads the socket inodes a process holds: each entry of
// /proc/PID/fd is a link whose target reads "socket:[<inode>]" for a socket
// (proc(5)). Descriptors closed while reading are skipped.
func socketInodes(fdDir string) ([]uint64, error) {
	f, err := os.Open(fdDir)
	if err != nil {
		return nil, err
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return nil, err
	}
	var out []uint64
	for _, n := range names {
		target, err := os.Readlink(filepath.Join(fdDir, n))
		if err != nil {
			continue
		}
		if v, ok := strings.CutPrefix(target, "socket:["); ok {
			if ino, err := strconv.ParseUint(strings.TrimSuffix(v, "]"), 10, 64); err == nil {
				out = append(out, ino)
			}
		}
	}
	return out, nil
}

// realUID reads the real uid: the first number of the Uid: line of
// /proc/PID/status (real, effective, saved, filesystem).
func realUID(status string) (int, error) {
	data, err := os.ReadFile(status)
	if err != nil {
		return 0, err
	}
	for line := range bytes.Lines(data) {
		if rest, ok := bytes.CutPrefix(line, []byte("Uid:")); ok {
			f := bytes.Fields(rest)
			if len(f) > 0 {
				return strconv.Atoi(string(f[0]))
			}
		}
	}
	return 0, errors.New(status + ": no Uid line")
}

// readCmdline reads /proc/PID/cmdline: the arguments, each ended by NUL.
// It is empty for kernel threads and zombies.
func readCmdline(name string) []string {
	data, err := os.ReadFile(name)
	if err != nil || len(data) == 0 {
		return []string{}
	}
	return strings.Split(strings.TrimSuffix(string(data), "\x00"), "\x00")
}

// homeOf returns the home directory under prefix that cwd is in:
// homeOf("/home", "/home/alice/www") is "/home/alice".
func homeOf(prefix, cwd string) (string, bool) {
	rest, ok := strings.CutPrefix(cwd, prefix+"/")
	if !ok || rest == "" {
		return "", false
	}
	user, _, _ := strings.Cut(rest, "/")
	return prefix + "/" + user, true
}
