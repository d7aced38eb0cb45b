package local

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"relay/config"
)

// SettingsFile is the file in data_dir where `relay serve` writes what
// relay qq needs, at start and on every reload; relay-qq (the C build)
// reads only that file, at a path fixed when it is built.
const SettingsFile = "qq.settings"

// Settings is what relay qq needs to know.
type Settings struct {
	Socket       string   // the daemon's local socket
	QmailQueue   string   // the real qmail-queue
	OnDaemonDown string   // DaemonDownAccept or DaemonDownDefer
	ExemptUIDs   []uint32 // callers that skip the daemon entirely, ascending
}

// NewSettings takes the settings from a config: the first local listener's
// socket and the [local] section. The exempt uids are those whose name in
// accounts (uid to /etc/passwd name, as config.ReadPasswd reads it) is in
// local.exempt_users, the rule the daemon applies to its own answers.
func NewSettings(cfg *config.Config, accounts map[uint32]string) (Settings, error) {
	socket, err := SocketPath(cfg)
	if err != nil {
		return Settings{}, err
	}
	if cfg.Local.QmailQueue == "" {
		return Settings{}, errors.New("local.qmail_queue is empty: relay qq needs the real qmail-queue")
	}
	down := cfg.Local.OnDaemonDown
	switch down {
	case "":
		down = DaemonDownAccept
	case DaemonDownAccept, DaemonDownDefer:
	default:
		return Settings{}, fmt.Errorf("local.on_daemon_down = %q: want %q or %q", down, DaemonDownAccept, DaemonDownDefer)
	}
	s := Settings{Socket: socket, QmailQueue: cfg.Local.QmailQueue, OnDaemonDown: down}
	for uid, name := range accounts {
		if slices.Contains(cfg.Local.ExemptUsers, name) {
			s.ExemptUIDs = append(s.ExemptUIDs, uid)
		}
	}
	slices.Sort(s.ExemptUIDs)
	return s, nil
}

// Marshal is the settings file: "key=value" lines after a comment.
func (s Settings) Marshal() ([]byte, error) {
	var b bytes.Buffer
	b.WriteString("# Written by relay serve at start and on every reload, for relay qq.\n# Edits are lost: change relay.toml and reload.\n")
	uids := make([]string, len(s.ExemptUIDs))
	for i, u := range s.ExemptUIDs {
		uids[i] = strconv.FormatUint(uint64(u), 10)
	}
	for _, kv := range [][2]string{
		{"socket", s.Socket},
		{"qmail_queue", s.QmailQueue},
		{"on_daemon_down", s.OnDaemonDown},
		{"exempt_uids", strings.Join(uids, ",")},
	} {
		if strings.ContainsFunc(kv[1], func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			return nil, fmt.Errorf("%s %q has a control character", kv[0], kv[1])
		}
		fmt.Fprintf(&b, "%s=%s\n", kv[0], kv[1])
	}
	return b.Bytes(), nil
}

// WriteSettings writes s to path at once: a temporary file in the same
// directory, synced, readable by everyone (relay qq runs as whoever
// injects mail), then renamed over path, so a reader sees the old file or
// the new one, never a part.
func WriteSettings(path string, s Settings) error {
	text, err := s.Marshal()
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(text)
	if err == nil {
		err = f.Chmod(0o644)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// OthersCanRead reports why a user other than its owner could not read
// the file at path (relay qq runs as whoever injects mail): a directory on
// the way that others may not search, or a file they may not read.
func OthersCanRead(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return err
	}
	if fi.Mode().Perm()&0o004 == 0 {
		return fmt.Errorf("%s is not readable by other users (mode %v)", abs, fi.Mode().Perm())
	}
	for dir := filepath.Dir(abs); ; dir = filepath.Dir(dir) {
		fi, err := os.Stat(dir)
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("%s is not searchable by other users (mode %v)", dir, fi.Mode().Perm())
		}
		if dir == filepath.Dir(dir) {
			return nil
		}
	}
}
