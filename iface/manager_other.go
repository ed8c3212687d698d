//go:build !linux

package iface

import "iapd/policy"

// NewManager returns ErrUnsupported: only Linux has an implementation.
func NewManager(cfg ManagerConfig) (*Manager, error) {
	return nil, ErrUnsupported
}

// Update returns ErrUnsupported: only Linux has an implementation.
func (m *Manager) Update(p *policy.Policy) error {
	return ErrUnsupported
}
