//go:build !linux

package iface

// NewManager returns ErrUnsupported: only Linux has an implementation.
func NewManager(cfg ManagerConfig) (*Manager, error) {
	return nil, ErrUnsupported
}
