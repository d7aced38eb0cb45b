package local

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"relay/config"
)

// sendmail(8) exit codes (sysexits.h).
const (
	ExOK          = 0
	ExUsage       = 64 // bad command line, or no recipients
	ExUnavailable = 69 // permanent refusal (5xx)
	ExIOErr       = 74 // reading the message failed
	ExTempFail    = 75 // temporary refusal (4xx), or the daemon is unreachable
	ExNoPerm      = 77 // refused by policy or permission (5.7.x)
	ExConfig      = 78 // the configuration cannot be read
)

// DefaultSubmitTimeout bounds the wait for the daemon's reply to DATA,
// which comes only after the daemon has handed the message off.
const DefaultSubmitTimeout = 5 * time.Minute

// SendmailArgs is relay sendmail's command line.
type SendmailArgs struct {
	HeaderRecipients bool     // -t: recipients from To, Cc and Bcc as well as the arguments
	Sender           string   // -f: envelope sender ("" with SenderSet is the null sender)
	SenderSet        bool     // -f was given
	FullName         string   // -F: the name in an added From header
	Recipients       []string // the arguments after the options
}

// UsageError is a command line relay sendmail does not accept (exit 64).
type UsageError struct{ Msg string }

func (e *UsageError) Error() string { return e.Msg }

// ParseSendmailArgs parses the flags of qmail's sendmail wrapper
// (getopt "vimte:f:p:o:B:F:EJxb:", docs/qmail.md §3.2):
// -t, -f addr, -F name, -bm (the default), and -i, -oi, -o*, -od*, -v, -m,
// -x, -E*, -J*, -e*, -p*, -B* accepted and ignored, as qmail's wrapper does.
// Other -b modes (-bp, -bs, ...) and unknown flags are usage errors.
// Like qmail's getopt, options end at "--" or at the first argument that is
// not an option; the rest are recipients.
func ParseSendmailArgs(args []string) (*SendmailArgs, error) {
	a := &SendmailArgs{}
	i := 0
	for ; i < len(args); i++ {
		arg := args[i]
		if arg == "--" {
			i++
			break
		}
		if len(arg) < 2 || arg[0] != '-' {
			break
		}
		for j := 1; j < len(arg); j++ {
			flag := arg[j]
			switch flag {
			case 'v', 'i', 'm', 't', 'E', 'J', 'x':
				if flag == 't' {
					a.HeaderRecipients = true
				}
				continue
			case 'e', 'f', 'p', 'o', 'B', 'F', 'b':
			default:
				return nil, &UsageError{fmt.Sprintf("unknown option -%c", flag)}
			}
			// An option with a value: the rest of this word, or the next word.
			value := arg[j+1:]
			if value == "" {
				if i+1 >= len(args) {
					return nil, &UsageError{fmt.Sprintf("option -%c needs a value", flag)}
				}
				i++
				value = args[i]
			}
			switch flag {
			case 'f':
				a.Sender, a.SenderSet = strings.TrimSuffix(strings.TrimPrefix(value, "<"), ">"), true
				if strings.ContainsAny(a.Sender, "\r\n") {
					return nil, &UsageError{"-f: address contains a line break"}
				}
			case 'F':
				a.FullName = value
			case 'b':
				if value != "m" {
					return nil, &UsageError{fmt.Sprintf("-b%s is not supported (only -bm, deliver mail)", value)}
				}
			}
			j = len(arg) // the value used up the rest of the word
		}
	}
	a.Recipients = args[i:]
	return a, nil
}

// Sendmail is relay sendmail: it completes the message's header as
// qmail-inject does and submits it over the daemon's local socket, where it
// is counted against the caller's uid and handed off by the daemon.
type Sendmail struct {
	Socket          string        // the daemon's local socket
	Hostname        string        // the domain of added addresses and of Message-ID
	UID             int           // the caller's uid (os.Getuid()), for the default From
	MaxMessageBytes int64         // a message larger than this is refused before it is sent; 0 = no cap
	Timeout         time.Duration // connect and per-command; 0 = DefaultTimeout
	SubmitTimeout   time.Duration // reply to DATA; 0 = DefaultSubmitTimeout
	Stderr          io.Writer     // one line on failure
	Now             func() time.Time
}

// NewSendmail builds relay sendmail from the config.
func NewSendmail(cfg *config.Config, stderr io.Writer) (*Sendmail, error) {
	socket, err := SocketPath(cfg)
	if err != nil {
		return nil, err
	}
	return &Sendmail{
		Socket:          socket,
		Hostname:        hostname(cfg),
		UID:             os.Getuid(),
		MaxMessageBytes: cfg.Relay.MaxMessageBytes,
		Stderr:          stderr,
	}, nil
}

// Run reads the message from stdin, completes its header, and submits it.
// It returns sendmail's exit code and writes one line to Stderr on failure.
func (s *Sendmail) Run(args *SendmailArgs, stdin io.Reader) int {
	if s.MaxMessageBytes > 0 {
		stdin = io.LimitReader(stdin, s.MaxMessageBytes+1)
	}
	raw, err := io.ReadAll(stdin)
	if err != nil {
		return s.fail(ExIOErr, "reading the message: %v", err)
	}
	if s.MaxMessageBytes > 0 && int64(len(raw)) > s.MaxMessageBytes {
		return s.fail(ExUnavailable, "message larger than relay.max_message_bytes (%d)", s.MaxMessageBytes)
	}
	user := accountName(s.UID)
	if user == "" {
		user = strconv.Itoa(s.UID)
	}
	defaultAddr := user + "@" + s.Hostname
	from := defaultAddr
	if args.SenderSet && args.Sender != "" {
		from = args.Sender
	}
	msg, headerRcpts := completeMessage(raw, headerDefaults{
		From:      from,
		FullName:  args.FullName,
		Hostname:  s.Hostname,
		Now:       s.now(),
		Pid:       os.Getpid(),
		WantRcpts: args.HeaderRecipients,
	})
	rcpts := uniqueAddrs(append(headerRcpts, args.Recipients...), s.Hostname)
	if len(rcpts) == 0 {
		return s.fail(ExUsage, "no recipients (give addresses as arguments, or -t to read To, Cc and Bcc)")
	}
	for _, r := range rcpts {
		if strings.ContainsAny(r, "\r\n") {
			return s.fail(ExUsage, "recipient %q contains a line break", r)
		}
	}
	sender := defaultAddr
	if args.SenderSet {
		sender = args.Sender
	}
	return s.submit(sender, rcpts, msg)
}

// submit sends the message as an ordinary local SMTP submission.
func (s *Sendmail) submit(sender string, rcpts []string, msg []byte) int {
	c, err := dial(s.Socket, "localhost", s.timeout())
	if err != nil {
		return s.fail(ExTempFail, "cannot reach relay daemon at %s: %v", s.Socket, err)
	}
	defer c.Close()
	c.SubmissionTimeout = s.SubmitTimeout
	if c.SubmissionTimeout <= 0 {
		c.SubmissionTimeout = DefaultSubmitTimeout
	}
	if err := c.Mail(sender, nil); err != nil {
		return s.refused(fmt.Sprintf("sender <%s>", sender), err)
	}
	for _, r := range rcpts {
		if err := c.Rcpt(r, nil); err != nil {
			return s.refused(fmt.Sprintf("recipient <%s>", r), err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return s.refused("message", err)
	}
	if _, err := w.Write(msg); err != nil {
		return s.refused("message", err)
	}
	if err := w.Close(); err != nil {
		return s.refused("message", err)
	}
	c.Quit()
	return ExOK
}

// refused maps a failed command to sendmail's exit code: 4xx and transport
// failures 75, 5.7.x 77, other 5xx 69.
func (s *Sendmail) refused(what string, err error) int {
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		return s.fail(ExTempFail, "relay daemon at %s failed: %v", s.Socket, err)
	}
	code := ExTempFail
	switch {
	case se.Code < 500:
	case se.EnhancedCode[0] == 5 && se.EnhancedCode[1] == 7:
		code = ExNoPerm
	default:
		code = ExUnavailable
	}
	return s.fail(code, "%s refused: %s", what, replyLine(se))
}

func replyLine(se *smtp.SMTPError) string {
	if se.EnhancedCode != (smtp.EnhancedCode{}) && se.EnhancedCode != smtp.NoEnhancedCode {
		e := se.EnhancedCode
		return fmt.Sprintf("%d %d.%d.%d %s", se.Code, e[0], e[1], e[2], se.Message)
	}
	return fmt.Sprintf("%d %s", se.Code, se.Message)
}

func (s *Sendmail) fail(code int, format string, args ...any) int {
	if s.Stderr != nil {
		fmt.Fprintf(s.Stderr, "relay sendmail: "+format+"\n", args...)
	}
	return code
}

func (s *Sendmail) timeout() time.Duration {
	if s.Timeout > 0 {
		return s.Timeout
	}
	return DefaultTimeout
}

func (s *Sendmail) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

// uniqueAddrs qualifies bare local names with @host (as qmail-inject adds
// its default host) and drops repeats, compared without case, keeping the
// first spelling.
func uniqueAddrs(addrs []string, host string) []string {
	seen := make(map[string]bool, len(addrs))
	out := make([]string, 0, len(addrs))
	for _, a := range addrs {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		if !strings.Contains(a, "@") {
			a += "@" + host
		}
		key := strings.ToLower(a)
		if seen[key] {
			continue
		}
		seen[key] = true
		out = append(out, a)
	}
	return out
}
