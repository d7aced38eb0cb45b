package policy

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// notification is what the admin is told on throttle start and on
// suspension; it is also the webhook's JSON body.
type notification struct {
	Event           string    `json:"event"` // throttle_start | suspended
	Identity        string    `json:"identity"`
	Kind            string    `json:"kind"`
	Account         string    `json:"account,omitempty"`
	Script          string    `json:"script,omitempty"`
	Limit           string    `json:"limit,omitempty"` // "500 recipients/1h"
	Used            int64     `json:"used,omitempty"`  // counted in that window when it fired
	OverLimitEvents int       `json:"over_limit_events_24h,omitempty"`
	Action          string    `json:"action,omitempty"` // defer | reject | hold
	Reason          string    `json:"reason,omitempty"` // suspension reason given by an admin
	MessageID       string    `json:"message_id,omitempty"`
	Subject         string    `json:"subject,omitempty"`
	Hostname        string    `json:"hostname,omitempty"`
	Time            time.Time `json:"time"`
}

// notifyJob is one notification with where it goes.
type notifyJob struct {
	n              notification
	webhook, email string
}

// notifyQueue bounds the notifications waiting for the worker; beyond it
// they are dropped (and logged), never waited for.
const notifyQueue = 64

// notifier sends notifications from one background goroutine, at most one
// per identity and event kind per notifySpacing.
type notifier struct {
	client   *http.Client
	sendMail func(ctx context.Context, from string, to []string, msg []byte) error
	log      *slog.Logger
	queue    chan notifyJob
	ctx      context.Context
	cancel   context.CancelFunc
	done     chan struct{}

	mu     sync.Mutex
	last   map[string]time.Time // event kind + "\x00" + identity -> last sent
	closed bool
}

func newNotifier(client *http.Client, sendMail func(context.Context, string, []string, []byte) error, log *slog.Logger) *notifier {
	ctx, cancel := context.WithCancel(context.Background())
	n := &notifier{
		client: client, sendMail: sendMail, log: log,
		queue: make(chan notifyJob, notifyQueue), ctx: ctx, cancel: cancel,
		done: make(chan struct{}), last: make(map[string]time.Time),
	}
	go n.run()
	return n
}

// send queues n unless one like it went out within notifySpacing. It never
// blocks.
func (nt *notifier) send(n notification, c *policyConf, now time.Time) {
	if c.webhook == "" && (c.notifyEmail == "" || nt.sendMail == nil) {
		return
	}
	key := n.Event + "\x00" + n.Identity
	nt.mu.Lock()
	defer nt.mu.Unlock()
	if nt.closed {
		return
	}
	if t, ok := nt.last[key]; ok && now.Sub(t) < notifySpacing {
		return
	}
	if len(nt.last) >= 10000 {
		for k, t := range nt.last {
			if now.Sub(t) >= notifySpacing {
				delete(nt.last, k)
			}
		}
	}
	n.Hostname = c.hostname
	select {
	case nt.queue <- notifyJob{n: n, webhook: c.webhook, email: c.notifyEmail}:
		nt.last[key] = now
	default:
		nt.log.Warn("policy: notification queue full, dropped", "event", n.Event, "identity", n.Identity)
	}
}

func (nt *notifier) run() {
	defer close(nt.done)
	for j := range nt.queue {
		if j.webhook != "" {
			if err := nt.post(j.webhook, j.n); err != nil {
				nt.log.Error("policy: webhook", "url", j.webhook, "event", j.n.Event, "identity", j.n.Identity, "err", err)
			}
		}
		if j.email != "" && nt.sendMail != nil {
			ctx, cancel := context.WithTimeout(nt.ctx, webhookTimeout)
			// The null sender: a notification must never bounce back into a loop.
			err := nt.sendMail(ctx, "", []string{j.email}, notifyMessage(j.n, j.email))
			cancel()
			if err != nil {
				nt.log.Error("policy: notification email", "to", j.email, "event", j.n.Event, "identity", j.n.Identity, "err", err)
			}
		}
	}
}

func (nt *notifier) post(url string, n notification) error {
	body, err := json.Marshal(n)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(nt.ctx, webhookTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := nt.client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("status %s", resp.Status)
	}
	return nil
}

// close stops the worker; notifications still queued or in flight are
// abandoned (logged), so shutdown never waits on a dead webhook.
func (nt *notifier) close() {
	nt.mu.Lock()
	if !nt.closed {
		nt.closed = true
		close(nt.queue)
	}
	nt.mu.Unlock()
	nt.cancel()
	<-nt.done
}

// notifyMessage is the notification email in qmail's stored form (LF).
func notifyMessage(n notification, to string) []byte {
	host := oneLine(n.Hostname)
	if host == "" {
		host = "localhost"
	}
	what := "is throttled"
	if n.Event == EventSuspended {
		what = "is suspended"
	}
	var b strings.Builder
	hdr := func(k, v string) {
		if v = oneLine(v); v != "" {
			b.WriteString(k + ": " + v + "\n")
		}
	}
	hdr("From", "relay <MAILER-DAEMON@"+host+">")
	hdr("To", "<"+to+">")
	hdr("Subject", "relay: "+n.Identity+" "+what)
	hdr("Date", n.Time.Format(time.RFC1123Z))
	hdr("Message-ID", "<"+strconv.FormatInt(n.Time.UnixNano(), 36)+".relay-notify@"+host+">")
	hdr("Auto-Submitted", "auto-generated")
	hdr("MIME-Version", "1.0")
	hdr("Content-Type", "text/plain; charset=utf-8")
	b.WriteString("\n")
	hdr("Event", n.Event)
	hdr("Identity", n.Identity)
	hdr("Account", n.Account)
	hdr("Script", n.Script)
	hdr("Limit", n.Limit)
	if n.Used > 0 {
		hdr("Used", strconv.FormatInt(n.Used, 10))
	}
	if n.OverLimitEvents > 0 {
		hdr("Over-limit events in 24h", strconv.Itoa(n.OverLimitEvents))
	}
	hdr("Action", n.Action)
	hdr("Reason", n.Reason)
	hdr("Sample Message-ID", n.MessageID)
	hdr("Sample Subject", n.Subject)
	hdr("Server", host)
	return []byte(b.String())
}

// oneLine keeps a value on one line so it cannot add header fields.
func oneLine(s string) string {
	if strings.ContainsAny(s, "\r\n") {
		s = strings.NewReplacer("\r", " ", "\n", " ").Replace(s)
	}
	return s
}
