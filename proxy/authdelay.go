package proxy

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// maxAuthDelayFactor caps the wait after repeated failures at this
	// multiple of the first wait.
	maxAuthDelayFactor = 16
	// authMemory is how long an address's failures are remembered after
	// its last one.
	authMemory = 15 * time.Minute
	// maxAuthRecords bounds the addresses remembered, so that a flood from
	// many addresses cannot grow the table without end.
	maxAuthRecords = 16384
)

// authThrottle slows down password guessing from one client address for
// one user name: after a failed login, the next attempts are checked one
// at a time, each waiting the delay of the failures so far, which doubles
// with each failure up to maxAuthDelayFactor times the base. A success
// forgets the failures. Counting per user name as well matters on a local
// proxy, whose clients mostly share 127.0.0.1: an app that keeps sending a
// wrong password must not slow down the logins of the others. IPv6 clients
// are counted per /64, which one host usually holds whole. It is safe for
// concurrent use; a zero base turns it off.
type authThrottle struct {
	base atomic.Int64 // time.Duration; 0 turns the throttle off

	mu      sync.Mutex
	records map[authKey]*authRecord // guarded by mu
}

// authKey identifies whose failures a record counts.
type authKey struct {
	client netip.Addr // see newAuthKey
	user   string
}

type authRecord struct {
	failures int
	next     time.Time // when the next attempt may be checked
	last     time.Time // of the last failure
}

// newAuthThrottle returns a throttle that is off until setBase.
func newAuthThrottle() *authThrottle {
	return &authThrottle{records: make(map[authKey]*authRecord)}
}

// setBase sets the wait after one failure; 0 turns the throttle off.
func (a *authThrottle) setBase(base time.Duration) { a.base.Store(int64(base)) }

// newAuthKey returns the key of user's logins from client, which stands
// for the client's whole host.
func newAuthKey(client netip.Addr, user string) authKey {
	// A choice after '+' (dev+cell) does not make another user, and must
	// not give a guesser a fresh count.
	user, _, _ = strings.Cut(user, "+")
	client = client.Unmap().WithZone("")
	if client.Is6() {
		p, _ := client.Prefix(64)
		client = p.Addr()
	}
	return authKey{client: client, user: user}
}

// delay returns the wait after failures failed attempts.
func (a *authThrottle) delay(failures int) time.Duration {
	if failures <= 0 {
		return 0
	}
	return time.Duration(a.base.Load()) * time.Duration(min(1<<(failures-1), maxAuthDelayFactor))
}

// wait blocks until an attempt of user from client may be checked. It
// reports false, without waiting, when that time is past deadline, and
// false when ctx ends first; the caller then rejects the attempt
// unchecked. delayed reports whether the attempt had to wait at all.
func (a *authThrottle) wait(ctx context.Context, client netip.Addr, user string, deadline time.Time) (ok, delayed bool) {
	if a.base.Load() <= 0 || !client.IsValid() {
		return true, false
	}
	now := time.Now()
	key := newAuthKey(client, user)

	a.mu.Lock()
	r, found := a.records[key]
	if !found || now.Sub(r.last) > authMemory {
		a.mu.Unlock()
		return true, false
	}
	start := r.next
	if start.Before(now) {
		start = now
	}
	if !deadline.IsZero() && start.After(deadline) {
		a.mu.Unlock()
		return false, true
	}
	// Attempts that arrive together are spaced out, so that parallel
	// connections do not multiply the rate.
	r.next = start.Add(a.delay(r.failures))
	a.mu.Unlock()

	timer := time.NewTimer(start.Sub(now))
	defer timer.Stop()
	select {
	case <-timer.C:
		return true, true
	case <-ctx.Done():
		return false, true
	}
}

// failed records a failed login of user from client.
func (a *authThrottle) failed(client netip.Addr, user string) {
	if a.base.Load() <= 0 || !client.IsValid() {
		return
	}
	now := time.Now()
	key := newAuthKey(client, user)

	a.mu.Lock()
	defer a.mu.Unlock()
	r, found := a.records[key]
	if !found || now.Sub(r.last) > authMemory {
		if !found && len(a.records) >= maxAuthRecords {
			a.pruneLocked(now)
		}
		r = &authRecord{}
		a.records[key] = r
	}
	r.failures++
	r.last = now
	if next := now.Add(a.delay(r.failures)); next.After(r.next) {
		r.next = next
	}
}

// succeeded forgets the failures of user from client.
func (a *authThrottle) succeeded(client netip.Addr, user string) {
	if a.base.Load() <= 0 || !client.IsValid() {
		return
	}
	a.mu.Lock()
	delete(a.records, newAuthKey(client, user))
	a.mu.Unlock()
}

// pruneLocked drops forgotten records and, when the table is still full,
// the oldest half, so that new addresses are always counted.
func (a *authThrottle) pruneLocked(now time.Time) {
	for key, r := range a.records {
		if now.Sub(r.last) > authMemory {
			delete(a.records, key)
		}
	}
	if len(a.records) < maxAuthRecords {
		return
	}
	cutoff := now.Add(-authMemory / 2)
	for len(a.records) >= maxAuthRecords/2 {
		for key, r := range a.records {
			if r.last.Before(cutoff) {
				delete(a.records, key)
			}
		}
		cutoff = cutoff.Add(authMemory / 4)
	}
}
