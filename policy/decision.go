package policy

import (
	"strconv"
	"strings"
	"time"

	"relay/config"
)

// String names an action the way logs and metrics do.
func (a Action) String() string {
	switch a {
	case Accept:
		return "accept"
	case TooManyRcpts:
		return "too_many_rcpts"
	case Hold:
		return "hold"
	case Defer:
		return "defer"
	case Reject:
		return "reject"
	case Queue:
		return "queue"
	}
	return "action(" + strconv.Itoa(int(a)) + ")"
}

// Text is the reply text for a decision, without the SMTP codes, e.g.
// "uid:web1:1001 is over 500 recipients/1h; try again in 12m",
// "sender:x@y is suspended" or "user:bob is over 50 recipients per message".
// It is "" for a plain Accept. An observed decision gives the text enforce
// mode would have replied.
func (d Decision) Text() string {
	switch {
	case d.Action == Accept && !d.Observed:
		return ""
	case d.Identity == "":
		return d.Limit
	case d.Suspended:
		return d.Identity + " is suspended"
	case d.Behind > 0 && d.Limit == "":
		return d.Identity + " has " + strconv.FormatInt(d.Behind, 10) + " messages waiting in its release queue"
	}
	s := d.Identity + " is over " + d.Limit
	if d.RetryIn > 0 {
		s += "; try again in " + FormatRetry(d.RetryIn)
	}
	return s
}

// FormatRetry writes a wait rounded up: "45s" below a minute, "1m1s" below
// ten minutes, "12m" below an hour, else hours and minutes ("1h30m", "2h").
func FormatRetry(d time.Duration) string {
	if d <= 0 {
		return "0s"
	}
	secs := int64((d + time.Second - 1) / time.Second)
	if secs < 60 {
		return strconv.FormatInt(secs, 10) + "s"
	}
	if secs < 600 { // to the second while it is short: "1m1s", not "2m"
		s := strconv.FormatInt(secs/60, 10) + "m"
		if secs%60 != 0 {
			s += strconv.FormatInt(secs%60, 10) + "s"
		}
		return s
	}
	mins := (secs + 59) / 60
	if mins < 60 {
		return strconv.FormatInt(mins, 10) + "m"
	}
	s := strconv.FormatInt(mins/60, 10) + "h"
	if mins%60 != 0 {
		s += strconv.FormatInt(mins%60, 10) + "m"
	}
	return s
}

// limitText names a rate the way replies do: "500 recipients/1h".
func limitText(metric uint8, n int64, w time.Duration) string {
	var b strings.Builder
	b.WriteString(strconv.FormatInt(n, 10))
	switch {
	case metric == metricMsgs && n == 1:
		b.WriteString(" message/")
	case metric == metricMsgs:
		b.WriteString(" messages/")
	case n == 1:
		b.WriteString(" recipient/")
	default:
		b.WriteString(" recipients/")
	}
	b.WriteString(config.FormatWindow(w))
	return b.String()
}

// paceText names a pace: "its pace of 20 messages/1s".
func paceText(r config.Rate) string {
	return "its pace of " + limitText(metricMsgs, r.N, r.Window)
}

// queueFullText names a full release queue: "10000 queued messages".
func queueFullText(n int64) string {
	return strconv.FormatInt(n, 10) + " queued messages"
}

// perMsgText names a per-message cap: "50 recipients per message".
func perMsgText(n int64) string {
	if n == 1 {
		return "1 recipient per message"
	}
	return strconv.FormatInt(n, 10) + " recipients per message"
}
