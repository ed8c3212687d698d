//go:build !linux

package iface

import "log/slog"

// NewMonitor returns ErrUnsupported: only Linux has an implementation.
func NewMonitor(logger *slog.Logger) (*Monitor, error) {
	return nil, ErrUnsupported
}
