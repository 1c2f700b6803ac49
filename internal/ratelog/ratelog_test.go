package ratelog

import (
	"testing"
	"time"
)

func TestAllow(t *testing.T) {
	l := New(time.Minute)
	t0 := time.Unix(1000, 0)
	if ok, n := l.Allow("a", t0); !ok || n != 0 {
		t.Fatalf("first: %v %d", ok, n)
	}
	for i := range 5 {
		if ok, _ := l.Allow("a", t0.Add(time.Duration(i+1)*time.Second)); ok {
			t.Fatalf("repeat %d within the minute went through", i)
		}
	}
	if ok, _ := l.Allow("b", t0.Add(time.Second)); !ok {
		t.Fatal("another name is held back by the first")
	}
	if ok, n := l.Allow("a", t0.Add(time.Minute)); !ok || n != 5 {
		t.Fatalf("after a minute: %v, suppressed %d, want true, 5", ok, n)
	}
	if ok, _ := l.Allow("a", t0.Add(time.Minute+time.Second)); ok {
		t.Fatal("the interval did not restart")
	}
}

func TestBounded(t *testing.T) {
	l := New(time.Second)
	t0 := time.Unix(1000, 0)
	for i := range maxNames {
		l.Allow(string(rune(i)), t0)
	}
	l.Allow("new", t0.Add(2*time.Second))
	if len(l.names) != 1 {
		t.Fatalf("%d names remembered, want the stale ones forgotten", len(l.names))
	}
}
