// Package logkey holds the attribute keys that every iapd log line uses, so
// that operators can filter on one spelling. It holds no logic.
package logkey

// Attribute keys for log/slog records.
const (
	App         = "app"
	AccessPoint = "access_point"
	Destination = "destination"
	Interface   = "interface"
	IfIndex     = "ifindex"
	Target      = "target"
	Listener    = "listener"
	Client      = "client"
	Component   = "component"
	Err         = "err"
)
