//go:build !linux

package proxy

import "net"

// ListenConfig returns the configuration that Listen opens sockets with,
// for callers that add options of their own to its Control. It sets
// keep-alive on each accepted connection, because not every system passes
// the listening socket's settings on.
func ListenConfig() *net.ListenConfig {
	return &net.ListenConfig{KeepAliveConfig: net.KeepAliveConfig{
		Enable:   true,
		Idle:     keepAliveIdle,
		Interval: keepAliveInterval,
		Count:    keepAliveCount,
	}}
}
