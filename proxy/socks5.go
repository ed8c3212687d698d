package proxy

import (
	"context"
	"errors"
	"log"
	"log/slog"
	"net"
	"time"

	socks5 "github.com/armon/go-socks5"

	"iapd/internal/logkey"
	"iapd/policy"
)

// socks5Frontend serves the SOCKS5 clients of one listener with
// github.com/armon/go-socks5. Only CONNECT is served, because the library
// replies "command not supported" to BIND and UDP ASSOCIATE.
type socks5Frontend struct {
	s         *Server
	l         *policy.Listener
	logger    *slog.Logger
	libLogger *log.Logger // the library's log lines, at Debug
}

func (s *Server) newSOCKS5Frontend(l *policy.Listener) *socks5Frontend {
	logger := s.logger.With(logkey.Listener, l.Listen)
	return &socks5Frontend{
		s:         s,
		l:         l,
		logger:    logger,
		libLogger: slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
	}
}

// serveConn serves one client connection until its tunnel is set up, and
// reports whether a relay now owns the connection. A SOCKS4 or SOCKS4a
// client gets the SOCKS4 rejection instead of silence.
func (f *socks5Frontend) serveConn(c net.Conn) (relaying bool) {
	c.SetDeadline(time.Now().Add(f.s.currentLimits().HandshakeTimeout))
	first, c, err := peekByte(c)
	if err != nil {
		f.logger.Debug("reading first byte failed", logkey.Client, c.RemoteAddr().String(), logkey.Err, err)
		return false
	}
	if first == socks4Version {
		f.logger.Debug("client rejected: SOCKS4 is not supported", logkey.Client, c.RemoteAddr().String())
		rejectSOCKS4(c)
		return false
	}
	return f.serveSOCKS5(c)
}

// serveSOCKS5 serves one client connection whose first byte has been
// checked, until its tunnel is set up, and reports whether a relay now
// owns the connection. The handshake deadline that serveConn set holds
// until the upstream is dialled.
func (f *socks5Frontend) serveSOCKS5(c net.Conn) (relaying bool) {
	sess := &socks5Session{f: f, client: newClientConn(c)}

	// The library builds nothing costly, and a server per connection lets
	// the credential store, rules and dial hook share this client's state.
	lib, err := socks5.New(&socks5.Config{
		AuthMethods: f.authMethods(sess),
		Resolver:    deferredResolver{},
		Rules:       sess,
		Logger:      f.libLogger,
		Dial:        sess.dial,
	})
	if err != nil {
		f.logger.Error("creating SOCKS5 server failed", logkey.Err, err, "unexpected", true)
		return false
	}
	err = lib.ServeConn(sess.client)
	if !sess.handedOff {
		if err != nil && f.logger.Enabled(f.s.ctx, slog.LevelDebug) {
			f.logger.Debug("socks5 session ended", logkey.Client, c.RemoteAddr().String(), logkey.Err, err)
		}
		// Allow may have dialled on a path that never reached the dial
		// hook.
		if sess.upstream != nil {
			sess.upstream.Close()
		}
		return false
	}
	if err != nil {
		// The dial succeeded, but the success reply or the client's
		// buffered bytes could not be written.
		if f.logger.Enabled(f.s.ctx, slog.LevelDebug) {
			f.logger.Debug("socks5 tunnel failed to start", logkey.Client, c.RemoteAddr().String(), logkey.Err, err)
		}
		sess.upstream.Close()
		return false
	}
	f.s.startRelay(c, sess.upstream)
	return true
}

// authMethods returns the methods offered to a client. A listener with
// users offers only user name and password, so that a client that also
// offers "no authentication" is still asked for credentials. A listener of
// one app accepts both, and ignores any credentials sent.
func (f *socks5Frontend) authMethods(sess *socks5Session) []socks5.Authenticator {
	userPass := socks5.UserPassAuthenticator{Credentials: sess}
	if f.l.HasUsers() {
		return []socks5.Authenticator{userPass}
	}
	return []socks5.Authenticator{socks5.NoAuthAuthenticator{}, userPass}
}

// socks5Session is the state of one SOCKS5 client connection. It is the
// library's credential store and rule set for that connection. The library
// calls it from the connection's own goroutine only.
type socks5Session struct {
	f      *socks5Frontend
	client *clientConn
	app    *policy.App // identified by Valid; nil until then
	choice string      // access point or destination chosen in the user name; "" for none

	// The rule set dials, because only its refusal gets the SOCKS5 reply
	// "not allowed by ruleset". The dial hook hands on the result.
	upstream  *upstream // set by Allow when the dial succeeded
	dialErr   error     // set by Allow when the dial failed
	handedOff bool      // dial handed upstream to the library, which then sends the success reply
}

// Valid reports whether the credentials identify an app on the listener,
// and remembers that app and the client's choice. A login that failed
// before from the same client address and user name makes this one wait
// first.
func (sess *socks5Session) Valid(user, password string) bool {
	s, client := sess.f.s, remoteAddr(sess.client).Addr()
	deadline := time.Now().Add(s.currentLimits().HandshakeTimeout)
	if ok, delayed := s.auth.wait(s.ctx, client, user, deadline); !ok {
		s.stats.authDelayed.Add(1)
		sess.f.logger.Debug("credentials rejected unchecked: too many failures from this address", logkey.Client, client.String())
		return false
	} else if delayed {
		s.stats.authDelayed.Add(1)
	}

	app, choice, err := sess.f.l.Identify(user, policy.Password(password), true)
	if err != nil {
		s.stats.authFailures.Add(1)
		s.auth.failed(client, user)
		sess.f.logger.Debug("credentials rejected", logkey.Client, client.String(), "user", user, logkey.Err, err)
		return false
	}
	s.auth.succeeded(client, user)
	sess.app = app
	sess.choice = choice
	return true
}

// Allow identifies the app, dials the request's target for it and keeps
// the result for dial. It rejects the request, which the library replies
// to with 0x02 (connection not allowed by ruleset), in two cases. Either
// there is no app, which only a misconfigured listener of one app lacks,
// or the policy does not allow the connection: a target or choice its
// routes refuse, a local target, or the app at its cap.
func (sess *socks5Session) Allow(ctx context.Context, req *socks5.Request) (context.Context, bool) {
	app := sess.app
	if app == nil && !sess.f.l.HasUsers() {
		app = sess.f.l.App
	}
	if app == nil {
		sess.f.logger.Debug("client rejected: listener has no app", logkey.Client, sess.client.RemoteAddr().String())
		return ctx, false
	}

	target := req.DestAddr.Address()
	if err := policy.Refusal(app, target, sess.choice); err != nil {
		sess.f.logger.Info("connection refused by policy", logkey.App, app.Name, logkey.Target, target,
			"choice", sess.choice, logkey.Err, err)
		return ctx, false
	}
	dctx, cancel := sess.f.s.dialContext(ctx)
	defer cancel()
	up, err := sess.f.s.dial(dctx, app, sess.choice, sess.f.l, target)
	if err != nil {
		// Give the failure reply its own time, as the dial may have used
		// up the handshake's.
		sess.client.SetDeadline(time.Now().Add(sess.f.s.currentLimits().HandshakeTimeout))
		if isRefusal(err) {
			// dial logged a refusal by the routes already.
			if !errors.Is(err, policy.ErrNotAllowed) {
				sess.f.logger.Info("connection refused", logkey.App, app.Name, logkey.Target, target, logkey.Err, err)
			}
			return ctx, false
		}
		sess.f.logger.Debug("dial failed", logkey.App, app.Name, logkey.Target, target, logkey.Err, err)
		sess.dialErr = err
		return ctx, true
	}
	sess.upstream = up
	return ctx, true
}

// dial hands the library the result of Allow's dial. The error it returns
// carries only the phrase that makes the library send the matching reply
// code; the full error went to the log.
func (sess *socks5Session) dial(context.Context, string, string) (net.Conn, error) {
	if sess.dialErr != nil {
		return nil, errors.New(classify(sess.dialErr).String())
	}
	if sess.upstream == nil {
		// Allow runs before every dial, so this is a programming error.
		sess.f.logger.Error("dial without a dialled upstream", "unexpected", true)
		return nil, errors.New(failureHostUnreachable.String())
	}
	// The tunnel may stay idle for as long as its ends like.
	sess.client.SetDeadline(time.Time{})
	sess.handedOff = true
	sess.client.handOff()
	return &handoffUpstream{upstream: sess.upstream}, nil
}

// deferredResolver leaves names to the dial: the library resolves before
// the app is known and with the system resolver, while iapd must resolve
// with the resolver of the access point the connection leaves through.
// With no address, the library's AddrSpec.Address returns name:port.
type deferredResolver struct{}

func (deferredResolver) Resolve(ctx context.Context, _ string) (context.Context, net.IP, error) {
	return ctx, nil, nil
}
