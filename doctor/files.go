package doctor

import (
	"bytes"
	"debug/buildinfo"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// fileStat is a file's owner and mode bits as stat(2) gives them.
type fileStat struct {
	mode     uint32 // st_mode & 07777: setuid, setgid, sticky and rwx bits
	uid, gid int
	dir      bool
	dev, ino uint64
}

// Mode bits as in st_mode.
const (
	modeSetuid = 0o4000
	modeSetgid = 0o2000
)

// statPath stats path, following symlinks.
func statPath(path string) (fileStat, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return fileStat{}, err
	}
	return fileStat{
		mode: st.Mode & 0o7777,
		uid:  int(st.Uid), gid: int(st.Gid),
		dir: st.Mode&syscall.S_IFMT == syscall.S_IFDIR,
		dev: st.Dev, ino: st.Ino,
	}, nil
}

// cred is who would open a file: a uid and all its groups.
type cred struct {
	uid  int
	gids []int
}

func procCred(p *proc) cred { return cred{uid: p.uid, gids: append([]int{p.gid}, p.groups...)} }

// others is any user that is not the file's owner and not in its group.
var others = cred{uid: -1}

// may reports whether c may do what bit asks (4 read, 2 write, 1 execute
// or search) to a file with st's owner and mode, as the kernel decides
// it (root may read and write anything, and execute what anyone may).
func (c cred) may(st fileStat, bit uint32) bool {
	if c.uid == 0 {
		return bit != 1 || st.dir || st.mode&0o111 != 0
	}
	switch {
	case c.uid == st.uid:
		return st.mode>>6&bit != 0
	case slices.Contains(c.gids, st.gid):
		return st.mode>>3&bit != 0
	}
	return st.mode&bit != 0
}

// reach reports why c cannot reach path for bit: a directory on the way
// it may not search, or the file itself. nil when it can.
func (c cred) reach(path string, bit uint32) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	for dir := filepath.Dir(abs); ; dir = filepath.Dir(dir) {
		st, err := statPath(dir)
		if err != nil {
			return err
		}
		if !c.may(st, 1) {
			return &reachError{path: dir, dir: true, st: st}
		}
		if dir == filepath.Dir(dir) {
			break
		}
	}
	st, err := statPath(abs)
	if err != nil {
		return err
	}
	if !c.may(st, bit) {
		return &reachError{path: abs, st: st}
	}
	return nil
}

// userName is uid's login name, or the number.
func userName(uid int) string {
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		return u.Username
	}
	return strconv.Itoa(uid)
}

// groupName is gid's name, or the number.
func groupName(gid int) string {
	if g, err := user.LookupGroupId(strconv.Itoa(gid)); err == nil {
		return g.Name
	}
	return strconv.Itoa(gid)
}

// groupNames lists gids by name.
func groupNames(gids []int) string {
	names := make([]string, len(gids))
	for i, g := range gids {
		names[i] = groupName(g)
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ",")
}

// lookupUID is the uid of a user name, -1 when there is none.
func lookupUID(name string) int {
	u, err := user.Lookup(name)
	if err != nil {
		return -1
	}
	n, err := strconv.Atoi(u.Uid)
	if err != nil {
		return -1
	}
	return n
}

// binKind is what a program is, as far as relay is concerned.
type binKind int

const (
	binOther      binKind = iota // not relay's
	binRelay                     // the relay binary (cmd/relay)
	binRelayLocal                // relay-local (cmd/relay-local)
	binRelayQQ                   // relay-qq, the C build of relay qq (cmd/relay-qq)
)

func (k binKind) String() string {
	switch k {
	case binRelay:
		return "relay"
	case binRelayLocal:
		return "relay-local"
	case binRelayQQ:
		return "relay-qq"
	}
	return "not relay's"
}

// program is what identify learned of an executable.
type program struct {
	kind binKind
	// For relay-qq: the paths it was built with (-DRELAY_LOCAL_PATH,
	// -DRELAY_QQ_SETTINGS), "" when not found in the file.
	localPath    string
	settingsPath string
}

// relayQQMarkers are strings of cmd/relay-qq/relay-qq.c that any build
// of it keeps whole (a memfd's name, a format string; short constant
// strings may become instructions): each tells relay-qq from any other C
// program.
var relayQQMarkers = [][]byte{[]byte("relay-qq-message\x00"), []byte("relay daemon at %s")}

// maxProgramRead bounds how much of a C program identify reads.
const maxProgramRead = 8 << 20

// identify tells relay's programs from others: Go builds by the main
// package their build information names, relay-qq by its strings.
func identify(path string) (program, error) {
	if info, err := buildinfo.ReadFile(path); err == nil {
		switch info.Path {
		case "relay/cmd/relay":
			return program{kind: binRelay}, nil
		case "relay/cmd/relay-local":
			return program{kind: binRelayLocal}, nil
		}
		return program{kind: binOther}, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return program{}, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxProgramRead))
	if err != nil {
		return program{}, err
	}
	return identifyC(b), nil
}

// identifyC looks at a program that is not a Go build: relay-qq holds its
// message prefix and the absolute paths it was built with, each a
// NUL-terminated string.
func identifyC(b []byte) program {
	if !slices.ContainsFunc(relayQQMarkers, func(m []byte) bool { return bytes.Contains(b, m) }) {
		return program{kind: binOther}
	}
	p := program{kind: binRelayQQ}
	for s := range bytes.SplitSeq(b, []byte{0}) {
		if len(s) < 2 || s[0] != '/' || len(s) > 4096 || bytes.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r >= 0x7f }) {
			continue
		}
		switch filepath.Base(string(s)) {
		case "relay-local":
			if p.localPath == "" {
				p.localPath = string(s)
			}
		case "qq.settings":
			if p.settingsPath == "" {
				p.settingsPath = string(s)
			}
		}
	}
	return p
}

// String is the mode as chmod takes it, with owner and group.
func (st fileStat) String() string {
	return fmt.Sprintf("mode %04o %s:%s", st.mode, userName(st.uid), groupName(st.gid))
}
