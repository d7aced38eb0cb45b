package admin

import (
	"bytes"
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"time"

	"relay/queue"
)

// fakePolicy is an in-memory Policy.
type fakePolicy struct {
	mu      sync.Mutex
	senders map[string]*Sender
	events  []Event
	seq     uint64
	now     func() time.Time
}

func newFakePolicy(now func() time.Time, ss ...Sender) *fakePolicy {
	p := &fakePolicy{senders: map[string]*Sender{}, now: now}
	for _, s := range ss {
		s := s
		p.senders[s.ID] = &s
	}
	return p
}

func (p *fakePolicy) Senders(state string) []Sender {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []Sender
	for _, s := range p.senders {
		if state == StateAll || state == StateActive || state == s.State { // the fake keeps every sender "in memory"
			out = append(out, *s)
		}
	}
	slices.SortFunc(out, func(a, b Sender) int { return b.LastSeen.Compare(a.LastSeen) })
	return out
}

func (p *fakePolicy) Sender(id string) (Sender, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.senders[id]
	if !ok {
		return Sender{}, false
	}
	return *s, true
}

func (p *fakePolicy) add(ev Event) {
	p.seq++
	ev.Seq = p.seq
	if ev.Time.IsZero() {
		ev.Time = p.now()
	}
	p.events = append(p.events, ev)
}

func (p *fakePolicy) Suspend(id, reason string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, ok := p.senders[id]
	if !ok {
		s = &Sender{ID: id, Kind: id[:bytes.IndexByte([]byte(id), ':')]}
		p.senders[id] = s
	}
	s.State = StateSuspended
	s.Suspension = &Suspension{Reason: reason, At: p.now()}
	p.add(Event{Kind: "suspended", Identity: id, Detail: reason})
	return nil
}

func (p *fakePolicy) Unsuspend(id string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.senders[id]
	s.State, s.Suspension = StateOK, nil
	p.add(Event{Kind: "unsuspended", Identity: id})
	return nil
}

func (p *fakePolicy) Reset(id string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.senders[id]
	for i := range s.Usage {
		s.Usage[i].Used = 0
	}
	if s.State == StateThrottled {
		s.State = StateOK
	}
	p.add(Event{Kind: "reset", Identity: id})
	return nil
}

func (p *fakePolicy) Events(f EventFilter) []Event {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []Event
	for i := len(p.events) - 1; i >= 0; i-- {
		e := p.events[i]
		if (f.Identity == "" || f.Identity == e.Identity) && (f.Kind == "" || f.Kind == e.Kind) {
			out = append(out, e)
		}
		if f.Limit > 0 && len(out) == f.Limit {
			break
		}
	}
	return out
}

func (p *fakePolicy) RecordEvent(ev Event) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.add(ev)
	return nil
}

// fakeHeld is an in-memory hold spool whose Release hands off to handoff.
type fakeHeld struct {
	mu      sync.Mutex
	msgs    map[string]heldItem
	handoff queue.Handoff
}

type heldItem struct {
	meta queue.HeldMeta
	body []byte
}

func newFakeHeld(h queue.Handoff) *fakeHeld {
	return &fakeHeld{msgs: map[string]heldItem{}, handoff: h}
}

func (h *fakeHeld) put(meta queue.HeldMeta, body string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	meta.Size = int64(len(body))
	h.msgs[meta.ID] = heldItem{meta, []byte(body)}
}

func (h *fakeHeld) List() ([]queue.HeldMeta, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []queue.HeldMeta
	for _, it := range h.msgs {
		out = append(out, it.meta)
	}
	return out, nil
}

func (h *fakeHeld) Get(id string) (queue.HeldMeta, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	it, ok := h.msgs[id]
	if !ok {
		return queue.HeldMeta{}, queue.ErrHeldNotFound
	}
	return it.meta, nil
}

func (h *fakeHeld) Open(id string) (io.ReadCloser, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	it, ok := h.msgs[id]
	if !ok {
		return nil, queue.ErrHeldNotFound
	}
	return io.NopCloser(bytes.NewReader(it.body)), nil
}

func (h *fakeHeld) Release(ctx context.Context, id string) (queue.Receipt, error) {
	h.mu.Lock()
	it, ok := h.msgs[id]
	h.mu.Unlock()
	if !ok {
		return queue.Receipt{}, queue.ErrHeldNotFound
	}
	if h.handoff == nil {
		return queue.Receipt{}, errors.New("no hand-off")
	}
	r, err := h.handoff.Deliver(ctx, queue.Envelope{From: it.meta.From, To: it.meta.To}, bytes.NewReader(it.body))
	if err != nil {
		return r, err
	}
	h.mu.Lock()
	delete(h.msgs, id)
	h.mu.Unlock()
	return r, nil
}

func (h *fakeHeld) Delete(id string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.msgs[id]; !ok {
		return queue.ErrHeldNotFound
	}
	delete(h.msgs, id)
	return nil
}

// recordingHandoff remembers what it was handed.
type recordingHandoff struct {
	mu   sync.Mutex
	envs []queue.Envelope
	msgs []string
	err  error
}

func (r *recordingHandoff) Deliver(ctx context.Context, env queue.Envelope, msg io.Reader) (queue.Receipt, error) {
	b, err := io.ReadAll(msg)
	if err != nil {
		return queue.Receipt{}, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err != nil {
		return queue.Receipt{}, r.err
	}
	r.envs = append(r.envs, env)
	r.msgs = append(r.msgs, string(b))
	return queue.Receipt{Reply: "ok 1 qp 2"}, nil
}
