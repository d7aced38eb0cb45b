package signals

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"time"
)

// LogPath is the file the follower reads for the configured
// qmail_send_log: a multilog directory stands for its "current".
func LogPath(configured string) string {
	if st, err := os.Stat(configured); err == nil && st.IsDir() {
		return filepath.Join(configured, "current")
	}
	return configured
}

// Sample is what the last lines of a log say about it, as the follower
// would read them (`relay doctor`).
type Sample struct {
	Lines     int       // complete lines looked at
	QmailSend int       // lines the follower reads as qmail-send's (new msg, info msg, starting delivery, delivery, end msg)
	Multilog  int       // ... of those, with multilog's tai64n stamp
	Syslog    int       // ... of those, in a syslog line (splogger's stamp, or none)
	Stamped   int       // ... of those, with a stamp the follower reads (else they count when read)
	Malformed int       // lines that begin as qmail-send's but do not parse
	Long      int       // lines over the follower's bound, skipped whole
	Status    int       // qmail-send's "status: local N/M remote N/M" lines (not read by the follower)
	Last      time.Time // the newest stamp read; zero without one
}

// SampleLog reads the complete lines of the last `tail` bytes of the
// file at path (not a multilog directory: LogPath) and classifies them
// with the follower's own parser.
func SampleLog(path string, tail int64) (Sample, error) {
	var s Sample
	f, err := os.Open(path)
	if err != nil {
		return s, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return s, err
	}
	off := max(st.Size()-tail, 0)
	b, err := io.ReadAll(io.NewSectionReader(f, off, st.Size()-off))
	if err != nil {
		return s, err
	}
	if off > 0 { // the first line is cut: from the next one on
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return s, nil
		}
		b = b[i+1:]
	}
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		b = nil // no complete line
	}
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		ln := b[:i]
		b = b[i+1:]
		s.Lines++
		if len(ln) > maxLine {
			s.Long++
			continue
		}
		l := parseLine(ln)
		switch l.kind {
		case lineOther:
			if bytes.Contains(ln, []byte("status: local ")) {
				s.Status++
			}
			continue
		case lineBad:
			s.Malformed++
			continue
		}
		s.QmailSend++
		if len(ln) > 0 && ln[0] == '@' {
			s.Multilog++
		} else {
			s.Syslog++
		}
		if l.stamp != 0 {
			s.Stamped++
			if t := time.Unix(0, l.stamp); t.After(s.Last) {
				s.Last = t
			}
		}
	}
	return s, nil
}
