package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"iapd/dns"
	"iapd/internal/logkey"
	"iapd/policy"
)

// minAttemptTime is the least time one access point or one address gets
// when the time left is shared among those still to try, unless less than
// that is left. Without a share, an access point that drops packets would
// use up the client's whole deadline and the next one would never be tried.
const minAttemptTime = time.Second

// errNoAddresses is the resolve error when a lookup succeeds with no address.
var errNoAddresses = errors.New("no addresses found")

// dialContext returns ctx bounded by the dial timeout and cancelled when
// the server closes. Front ends wrap their dials in it.
func (s *Server) dialContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, s.currentLimits().DialTimeout)
	stop := context.AfterFunc(s.ctx, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}

// dial resolves and dials target (host:port as the client sent it) for app.
// It tries the access points of the plan for the destination that the
// app's routes, or the client's choice, give, each resolving the host with
// its own resolver: one after another in the plan's order, or, for a
// destination that races, staggered by its race delay. It returns the
// first connection, entered in the table. choice is the access point or
// destination the client chose, "" for none. It holds the app's and each
// access point's connection caps, passing over an access point that is
// full unless a connection of a lower priority app there can make room.
// Errors are *DialError.
func (s *Server) dial(ctx context.Context, app *policy.App, choice string, l *policy.Listener, target string) (*upstream, error) {
	host, port, err := splitTarget(target)
	if err != nil {
		return nil, &DialError{Op: "connect", App: app.Name, Destination: app.Destination.Name, Target: target, Err: err}
	}
	if addr, err := netip.ParseAddr(host); err == nil && !app.AllowLocalTargets && s.isLocalTarget(addr) {
		return nil, &DialError{Op: "connect", App: app.Name, Destination: app.Destination.Name, Target: target, Err: localTargetError(app, host, nil)}
	}

	cl, ok := s.table.claimApp(app)
	if !ok {
		err := fmt.Errorf("%w (max_connections %d)", ErrAppLimit, app.MaxConnections)
		return nil, &DialError{Op: "admit", App: app.Name, Destination: app.Destination.Name, Target: target, Err: err}
	}

	plan := policy.NewOverridePlan(app, target, choice, s.cfg.Network.Conditions())
	if err := plan.Err(); err != nil {
		s.table.release(cl)
		s.logPlanFailure(plan, target, err)
		derr := &DialError{Op: "select", App: app.Name, Destination: plan.DestinationName(), Target: target, Err: err}
		s.observeDial(app, "", target, 0, derr)
		return nil, derr
	}
	if plan.Route != nil {
		s.logger.Debug("route matched", logkey.App, app.Name, logkey.Target, target,
			"route", plan.Route.Index, logkey.Destination, plan.DestinationName())
	}

	gate := newCapGate(s, app, target)
	var c net.Conn
	var ap *policy.AccessPoint
	var derr *DialError
	if plan.Destination.Select == policy.SelectRace {
		c, ap, derr = s.dialRace(ctx, plan, host, port, target, gate)
	} else {
		c, ap, derr = s.dialInOrder(ctx, plan, host, port, target, gate)
	}
	if derr != nil {
		s.table.release(cl)
		derr.App = app.Name
		derr.Destination = plan.DestinationName()
		return nil, derr
	}
	// The victim is closed only once the new connection is established,
	// so that a failed dial costs no one their connection.
	var victim *upstream
	cl.accessPoint, victim = gate.won(ap)
	if victim != nil {
		s.displace(victim, app)
	}
	return s.track(c, app, plan.Destination, l, target, ap, cl), nil
}

// dialInOrder tries plan's candidates one after another, each within its
// share of the time left. It stops at a name that an access point's DNS
// servers report as nonexistent. That is a DNS response, not a failure of
// the access point, and asking the next one would send the name to
// another interface's servers. A full access point is passed over like an
// unusable one: its error becomes the primary cause only when no access
// point was dialled.
func (s *Server) dialInOrder(ctx context.Context, plan policy.Plan, host string, port uint16, target string, gate *capGate) (net.Conn, *policy.AccessPoint, *DialError) {
	var first, full *DialError
	var rest []error
	for i, ap := range plan.Candidates {
		if derr := gate.enter(ap); derr != nil {
			if full == nil {
				full = derr
			} else {
				rest = append(rest, derr)
			}
			continue
		}

		started := time.Now()
		c, derr := s.dialAttempt(ctx, plan.App, ap, host, port, target, len(plan.Candidates)-i)
		s.observeDial(plan.App, ap.Name, target, time.Since(started), derr)
		if derr == nil {
			if first != nil {
				s.logger.Debug("failed over", logkey.App, plan.App.Name, logkey.Target, target,
					logkey.AccessPoint, ap.Name, "failed_access_point", first.AccessPoint)
			}
			return c, ap, nil
		}
		gate.leave(ap)

		s.logger.Debug("access point failed", logkey.App, plan.App.Name, logkey.Target, target,
			logkey.AccessPoint, ap.Name, logkey.Err, derr.Err)
		if first == nil {
			first = derr
		} else {
			rest = append(rest, derr)
		}
		if ctx.Err() != nil || isNameNotFound(derr) {
			break
		}
	}

	// Like net.Dialer, report the first attempt's error: it comes from the
	// access point that the policy prefers.
	if first == nil {
		first = full
	} else if full != nil {
		rest = append(rest, full)
	}
	first.Rest = errors.Join(rest...)
	return nil, nil, first
}

// raceResult is the outcome of one access point's attempt in a race.
type raceResult struct {
	index int
	ap    *policy.AccessPoint
	conn  net.Conn
	err   *DialError
	took  time.Duration // resolving and connecting
}

// dialRace dials plan's first candidate, starts the next one when the
// running ones have not connected within the destination's race delay or
// as soon as one fails, and keeps the first connection. The others are
// cancelled, and any that connect anyway are closed. A full access point
// is passed over at once, its error in its place.
func (s *Server) dialRace(ctx context.Context, plan policy.Plan, host string, port uint16, target string, gate *capGate) (net.Conn, *policy.AccessPoint, *DialError) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	cands := plan.Candidates
	results := make(chan raceResult, len(cands))
	errs := make([]*DialError, len(cands))
	started, running := 0, 0
	startNext := func() {
		for started < len(cands) {
			i, ap := started, cands[started]
			started++
			if derr := gate.enter(ap); derr != nil {
				errs[i] = derr
				continue
			}
			running++
			go func() {
				started := time.Now()
				c, derr := s.dialThrough(ctx, plan.App, ap, host, port, target)
				results <- raceResult{index: i, ap: ap, conn: c, err: derr, took: time.Since(started)}
			}()
			return
		}
	}

	startNext()
	timer := time.NewTimer(plan.Destination.RaceDelay)
	defer timer.Stop()
	for running > 0 {
		select {
		case <-timer.C:
			if started < len(cands) {
				startNext()
				timer.Reset(plan.Destination.RaceDelay)
			}
		case r := <-results:
			running--
			s.observeDial(plan.App, r.ap.Name, target, r.took, r.err)
			if r.err == nil {
				cancel()
				go closeLosers(results, running, gate)
				if r.index > 0 {
					s.logger.Debug("race won by a later access point", logkey.App, plan.App.Name, logkey.Target, target,
						logkey.AccessPoint, r.ap.Name, "place", r.index+1)
				}
				return r.conn, r.ap, nil
			}
			errs[r.index] = r.err
			gate.leave(r.ap)
			s.logger.Debug("access point failed", logkey.App, plan.App.Name, logkey.Target, target,
				logkey.AccessPoint, r.ap.Name, logkey.Err, r.err.Err)
			if started < len(cands) && ctx.Err() == nil {
				startNext()
				timer.Reset(plan.Destination.RaceDelay)
			}
		}
	}

	// As in an ordered dial, the first candidate's error is the one the
	// client sees; every attempt started, so every slot is filled.
	var rest []error
	for _, e := range errs[1:started] {
		rest = append(rest, e)
	}
	errs[0].Rest = errors.Join(rest...)
	return nil, nil, errs[0]
}

// closeLosers waits for the n attempts of a race still running after it was
// won, closes the connections that some of them made regardless, and
// gives back their access points' caps.
func closeLosers(results <-chan raceResult, n int, gate *capGate) {
	for range n {
		r := <-results
		if r.conn != nil {
			r.conn.Close()
		}
		gate.leave(r.ap)
	}
}

// observeDial passes the outcome of one attempt to Config.OnDialAttempt.
func (s *Server) observeDial(app *policy.App, ap, target string, d time.Duration, derr *DialError) {
	if s.cfg.OnDialAttempt == nil {
		return
	}
	s.cfg.OnDialAttempt(DialAttempt{
		App:         app.Name,
		Destination: app.Destination.Name,
		AccessPoint: ap,
		Target:      target,
		Duration:    d,
		Err:         derr,
	})
}

// dialAttempt dials through ap within its share of the time left in ctx,
// which it splits evenly among the left access points still to try.
func (s *Server) dialAttempt(ctx context.Context, app *policy.App, ap *policy.AccessPoint, host string, port uint16, target string, left int) (net.Conn, *DialError) {
	ctx, cancel := shareDeadline(ctx, left)
	defer cancel()
	return s.dialThrough(ctx, app, ap, host, port, target)
}

// dialAccessPoint resolves and dials target through ap alone for app. The
// HTTP front end dials through it from its per-access-point transports.
// Errors are *DialError.
func (s *Server) dialAccessPoint(ctx context.Context, app *policy.App, ap *policy.AccessPoint, target string) (net.Conn, error) {
	host, port, err := splitTarget(target)
	if err != nil {
		return nil, &DialError{Op: "connect", AccessPoint: ap.Name, Interface: s.cfg.Network.Interface(ap), Target: target, Err: err}
	}
	c, derr := s.dialThrough(ctx, app, ap, host, port, target)
	if derr != nil {
		return nil, derr
	}
	return c, nil
}

// logPlanFailure logs why a plan has nothing to dial: a refusal by the
// policy at Info, since an operator may want to see what the routes
// reject, and no usable access point at Debug.
func (s *Server) logPlanFailure(plan policy.Plan, target string, err error) {
	if plan.Refused() != nil {
		s.logger.Info("connection refused by policy", logkey.App, plan.App.Name, logkey.Target, target,
			"choice", plan.Choice, logkey.Err, err)
		return
	}
	s.logger.Debug("no usable access point", logkey.App, plan.App.Name, logkey.Target, target, logkey.Err, err)
}

// dialThrough connects to target through ap for app: through its gateway
// proxy when it has one, and otherwise directly. It reports the outcome to
// the network.
//
// NOTE: through a gateway proxy, the gateway resolves names, so only
// address literals are checked against the local targets (in dial); a name
// that the gateway resolves to its own loopback stays on the gateway.
func (s *Server) dialThrough(ctx context.Context, app *policy.App, ap *policy.AccessPoint, host string, port uint16, target string) (c net.Conn, derr *DialError) {
	// The HTTP transport and races dial on goroutines of their own, where
	// a panic in a resolver or dialer would end the daemon.
	defer s.recoverDial(&derr, &DialError{AccessPoint: ap.Name, Interface: s.cfg.Network.Interface(ap), Target: target})

	if ap.Proxy != nil {
		c, derr = s.dialGateway(ctx, ap, target)
	} else {
		c, derr = s.dialDirect(ctx, ap, host, port, app)
		if derr != nil {
			derr.Target = target
		}
	}
	// A refusal of a local target says nothing about ap's health.
	if derr == nil || !errors.Is(derr, ErrLocalTarget) {
		s.reportDial(ctx, ap, derr)
	}
	return c, derr
}

// reportDial reports how an attempt through ap ended to the network. A
// failure is not reported when ctx was cancelled: then the client left or
// a race was won elsewhere, and the failure is no evidence against ap.
func (s *Server) reportDial(ctx context.Context, ap *policy.AccessPoint, derr *DialError) {
	switch {
	case derr == nil:
		s.cfg.Network.ReportDial(ap, nil)
	case !errors.Is(ctx.Err(), context.Canceled):
		s.cfg.Network.ReportDial(ap, derr)
	}
}

// dialDirect resolves host with ap's resolver, unless it is an address
// already, and dials the addresses in the resolver's order with ap's dialer
// until one connects. Unless guard is nil or allows local targets, it
// leaves out local addresses, so that a name cannot lead to a local
// service, whatever the DNS answer contains. The error's Target is left
// for the caller to set.
func (s *Server) dialDirect(ctx context.Context, ap *policy.AccessPoint, host string, port uint16, guard *policy.App) (net.Conn, *DialError) {
	derr := &DialError{AccessPoint: ap.Name, Interface: s.cfg.Network.Interface(ap)}

	addrs, err := s.lookup(ctx, ap, host)
	if err != nil {
		derr.Op = "resolve"
		derr.Err = err
		return nil, derr
	}
	if guard != nil && !guard.AllowLocalTargets {
		remote := s.withoutLocal(addrs)
		if len(remote) == 0 {
			resolved := addrs
			if _, err := netip.ParseAddr(host); err == nil {
				resolved = nil // an address literal, not a name
			}
			derr.Op = "connect"
			derr.Err = localTargetError(guard, host, resolved)
			return nil, derr
		}
		addrs = remote
	}

	dialer := s.cfg.Network.Dialer(ap)
	var firstErr error
	for i, addr := range addrs {
		actx, cancel := shareDeadline(ctx, len(addrs)-i)
		c, err := dialer.DialContext(actx, "tcp", netip.AddrPortFrom(addr, port).String())
		cancel()
		if err == nil {
			return c, nil
		}
		if firstErr == nil {
			firstErr = err
		}
		if ctx.Err() != nil {
			break
		}
	}
	derr.Op = "connect"
	derr.Err = firstErr
	return nil, derr
}

// withoutLocal returns the addresses of addrs that are not local targets.
func (s *Server) withoutLocal(addrs []netip.Addr) []netip.Addr {
	remote := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if !s.isLocalTarget(a) {
			remote = append(remote, a)
		}
	}
	return remote
}

// localTargetError explains why host was refused as a local target. addrs
// are the addresses a name resolved to; nil for an address literal.
func localTargetError(app *policy.App, host string, addrs []netip.Addr) error {
	fix := fmt.Sprintf("set apps.%s.allow_local_targets to reach it", app.Name)
	if addrs == nil {
		return fmt.Errorf("%w: %s is on this host or its links; %s", ErrLocalTarget, host, fix)
	}
	return fmt.Errorf("%w: %s resolves only to addresses on this host or its links (%s); %s", ErrLocalTarget, host, joinAddrs(addrs), fix)
}

func joinAddrs(addrs []netip.Addr) string {
	texts := make([]string, len(addrs))
	for i, a := range addrs {
		texts[i] = a.String()
	}
	return strings.Join(texts, ", ")
}

// lookup returns the addresses of host from ap's resolver. An
// address literal is returned as it is, without asking any resolver.
func (s *Server) lookup(ctx context.Context, ap *policy.AccessPoint, host string) ([]netip.Addr, error) {
	if addr, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{addr.Unmap()}, nil
	}

	addrs, err := s.cfg.Network.Resolver(ap).LookupNetIP(ctx, host)
	if err != nil {
		return nil, err
	}
	if len(addrs) == 0 {
		return nil, errNoAddresses
	}
	for i := range addrs {
		addrs[i] = addrs[i].Unmap()
	}
	return addrs, nil
}

// splitTarget splits host:port and checks that the port is a number from 1
// to 65535.
func splitTarget(target string) (host string, port uint16, err error) {
	host, portText, err := net.SplitHostPort(target)
	if err != nil {
		return "", 0, fmt.Errorf("%w: %w", ErrInvalidTarget, err)
	}
	n, err := strconv.ParseUint(portText, 10, 16)
	if err != nil || n == 0 || host == "" {
		return "", 0, fmt.Errorf("%w: %q is not host:port with a port from 1 to 65535", ErrInvalidTarget, target)
	}
	return host, uint16(n), nil
}

// shareDeadline returns ctx limited to an even share of its time left among
// left attempts, and at least minAttemptTime of it. The last attempt gets
// ctx itself, with a cancel function that does nothing.
func shareDeadline(ctx context.Context, left int) (context.Context, context.CancelFunc) {
	deadline, ok := ctx.Deadline()
	if !ok || left <= 1 {
		return ctx, func() {}
	}
	remaining := time.Until(deadline)
	share := remaining / time.Duration(left)
	if share < minAttemptTime {
		share = min(minAttemptTime, remaining)
	}
	return context.WithTimeout(ctx, share)
}

// isNameNotFound reports whether derr is a DNS answer that the name does
// not exist, from an access point's own resolver or the host's.
func isNameNotFound(derr *DialError) bool {
	if derr.Op != "resolve" {
		return false
	}
	var sysErr *net.DNSError
	return errors.Is(derr.Err, dns.ErrNotFound) || (errors.As(derr.Err, &sysErr) && sysErr.IsNotFound)
}
