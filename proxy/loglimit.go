package proxy

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// logLimiter logs one message at most once per interval, with the number
// of times it was suppressed since the last record, so that a flood of
// refused clients or a failing accept cannot flood the log. It is safe for
// concurrent use.
type logLimiter struct {
	logger   *slog.Logger
	level    slog.Level
	msg      string
	interval time.Duration

	mu         sync.Mutex
	last       time.Time // guarded by mu; of the last record written
	suppressed int       // guarded by mu
}

func newLogLimiter(logger *slog.Logger, level slog.Level, msg string, interval time.Duration) *logLimiter {
	return &logLimiter{logger: logger, level: level, msg: msg, interval: interval}
}

// log writes the message with args, unless one was written within the
// interval, in which case it only counts.
func (l *logLimiter) log(args ...any) {
	now := time.Now()
	l.mu.Lock()
	if !l.last.IsZero() && now.Sub(l.last) < l.interval {
		l.suppressed++
		l.mu.Unlock()
		return
	}
	suppressed := l.suppressed
	l.last, l.suppressed = now, 0
	l.mu.Unlock()

	if suppressed > 0 {
		args = append(args, "suppressed", suppressed)
	}
	l.logger.Log(context.Background(), l.level, l.msg, args...)
}
