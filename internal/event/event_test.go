package event

import (
	"testing"
	"time"
)

func TestBusDeliversInOrder(t *testing.T) {
	b := NewBus()
	ch, cancel := b.Subscribe(4)
	defer cancel()

	b.Publish(Event{Kind: InterfaceDown, Interface: "cell"})
	b.Publish(Event{Kind: AccessPointUnusable, AccessPoint: "cell", Reason: "interface cell is down"})

	first, second := <-ch, <-ch
	if first.Seq != 1 || first.Kind != InterfaceDown || first.Interface != "cell" {
		t.Errorf("first event = %+v, want seq 1 interface_down cell", first)
	}
	if second.Seq != 2 || second.Reason != "interface cell is down" {
		t.Errorf("second event = %+v, want seq 2 with the reason", second)
	}
	if first.Time.IsZero() {
		t.Error("Publish left Time unset")
	}
}

func TestBusFullSubscriberDrops(t *testing.T) {
	b := NewBus()
	slow, cancelSlow := b.Subscribe(1)
	defer cancelSlow()
	fast, cancelFast := b.Subscribe(8)
	defer cancelFast()

	done := make(chan struct{})
	go func() {
		for range 3 {
			b.Publish(Event{Kind: InterfaceUp})
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Publish blocked on a full subscriber")
	}

	if got := len(fast); got != 3 {
		t.Errorf("fast subscriber has %d events, want 3", got)
	}
	if got := len(slow); got != 1 {
		t.Errorf("slow subscriber has %d events, want 1", got)
	}
	if got := b.Dropped(); got != 2 {
		t.Errorf("Dropped() = %d, want 2", got)
	}
}

func TestBusCancelClosesChannel(t *testing.T) {
	b := NewBus()
	ch, cancel := b.Subscribe(1)
	cancel()
	cancel() // a second call must not panic

	if _, ok := <-ch; ok {
		t.Error("channel still open after cancel")
	}
	b.Publish(Event{Kind: InterfaceUp}) // must not send on the closed channel
}
