package admin

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"relay/queue"
)

// Tables for relay ctl. Every cell goes through clean: subjects and
// addresses come from senders, and must not reach the admin's terminal as
// escape sequences or break the table.

func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
}

// clean makes one table cell: control characters (tabs and newlines
// included) become '?', and an empty value is "-".
func clean(s string) string {
	if s == "" {
		return "-"
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return '?'
		}
		return r
	}, s)
}

func row(w io.Writer, cells ...string) {
	for i, c := range cells {
		if i > 0 {
			io.WriteString(w, "\t")
		}
		io.WriteString(w, clean(c))
	}
	io.WriteString(w, "\n")
}

// usageText is "rcpts 120/100 per 1m, msgs 5/200 per 1h".
func usageText(us []Usage) string {
	parts := make([]string, 0, len(us))
	for _, u := range us {
		parts = append(parts, fmt.Sprintf("%s %d/%d per %s", u.Metric, u.Used, u.Limit, u.Window))
	}
	return strings.Join(parts, ", ")
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return stamp(t)
}

// WriteSenders writes senders as an aligned table.
func WriteSenders(w io.Writer, senders []Sender) error {
	tw := newTable(w)
	row(tw, "ID", "STATE", "ACCOUNT", "SCRIPTS", "USAGE", "RULE", "LAST SEEN")
	for _, s := range senders {
		row(tw, s.ID, s.State, s.Account, strings.Join(s.Scripts, ","), usageText(s.Usage), s.Rule, fmtTime(s.LastSeen))
	}
	return tw.Flush()
}

// WriteSender writes one sender's details and its recent events.
func WriteSender(w io.Writer, s Sender) error {
	tw := newTable(w)
	row(tw, "id:", s.ID)
	row(tw, "kind:", s.Kind)
	row(tw, "state:", s.State)
	if s.Account != "" {
		row(tw, "account:", s.Account)
	}
	if len(s.Scripts) > 0 {
		row(tw, "scripts:", strings.Join(s.Scripts, ", "))
	}
	row(tw, "rule:", s.Rule)
	if s.MaxRcptsPerMsg > 0 {
		row(tw, "rcpts per message:", strconv.FormatInt(s.MaxRcptsPerMsg, 10))
	}
	for _, u := range s.Usage {
		row(tw, "usage:", usageText([]Usage{u}))
	}
	row(tw, "last seen:", fmtTime(s.LastSeen))
	if s.Suspension != nil {
		row(tw, "suspended:", fmtTime(s.Suspension.At)+" "+s.Suspension.Reason)
	}
	row(tw, "last decision:", s.LastDecision)
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(s.Events) == 0 {
		return nil
	}
	fmt.Fprintln(w, "\nrecent events:")
	return WriteEvents(w, s.Events)
}

// WriteHeld writes the hold spool list.
func WriteHeld(w io.Writer, held []HeldSummary) error {
	tw := newTable(w)
	row(tw, "ID", "HELD AT", "IDENTITIES", "SENDER", "RCPTS", "SIZE", "SUBJECT")
	for _, h := range held {
		from := h.From
		if from == "" {
			from = "<>"
		}
		row(tw, h.ID, fmtTime(h.Time), strings.Join(h.Identities, ","), from,
			strconv.Itoa(h.Rcpts), strconv.FormatInt(h.Size, 10), h.Subject)
	}
	return tw.Flush()
}

// WriteQueues writes the release queues, one identity a line.
func WriteQueues(w io.Writer, qs []queue.ReleaseQueue) error {
	tw := newTable(w)
	row(tw, "IDENTITY", "WAITING", "RCPTS", "PACED", "OLDEST", "STATE", "NEXT", "DRAINS BY", "DETAIL")
	for _, q := range qs {
		row(tw, q.Identity, strconv.Itoa(q.Messages), strconv.Itoa(q.Recipients), strconv.Itoa(q.Paced),
			fmtTime(q.Oldest), q.State, fmtTime(q.NextTry), fmtTime(q.DrainsBy), q.Detail)
	}
	return tw.Flush()
}

// WriteHeldMessage writes a held message's envelope and header block.
func WriteHeldMessage(w io.Writer, m HeldMessage) error {
	tw := newTable(w)
	from := m.From
	if from == "" {
		from = "<>"
	}
	row(tw, "id:", m.ID)
	row(tw, "held at:", fmtTime(m.Time))
	row(tw, "reason:", m.Reason)
	row(tw, "identities:", strings.Join(m.Identities, ", "))
	row(tw, "from:", from)
	row(tw, "to:", strings.Join(m.To, ", "))
	row(tw, "size:", strconv.FormatInt(m.Size, 10))
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	for _, line := range strings.Split(strings.TrimRight(m.Headers, "\n"), "\n") {
		fmt.Fprintln(w, clean(strings.ReplaceAll(line, "\t", "    ")))
	}
	return nil
}

// WriteEvents writes events as an aligned table.
func WriteEvents(w io.Writer, events []Event) error {
	tw := newTable(w)
	row(tw, "TIME", "KIND", "IDENTITY", "ACCOUNT", "SCRIPT", "DETAIL")
	for _, e := range events {
		row(tw, fmtTime(e.Time), e.Kind, e.Identity, e.Account, e.Script, e.Detail)
	}
	return tw.Flush()
}
