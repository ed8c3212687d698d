//go:build !linux

package proxy

import "net"

// listenConfig sets keep-alive on each accepted connection, because not
// every system passes the listening socket's settings on.
func listenConfig() *net.ListenConfig {
	return &net.ListenConfig{KeepAliveConfig: net.KeepAliveConfig{
		Enable:   true,
		Idle:     keepAliveIdle,
		Interval: keepAliveInterval,
		Count:    keepAliveCount,
	}}
}
