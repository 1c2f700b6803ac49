package main

import (
	"context"
	"log/slog"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/exactlyonce/exactly"
	"github.com/exactlyonce/exactly/outbox"
	"github.com/exactlyonce/exactly/relay"
)

type nopPublisher struct{ name string }

func (*nopPublisher) Publish(context.Context, []*exactly.Message) error { return nil }

// TestCDCConfigCarriesTheSharedSettings: every setting relay.Config and
// pgcdc.Config both have (same name, same type) reaches the CDC relay from
// the relay settings, so a setting added to both cannot be left out of
// `exactly relay --source cdc`.
func TestCDCConfigCarriesTheSharedSettings(t *testing.T) {
	t.Parallel()
	ob, err := outbox.New(outbox.Config{Dialect: "postgres", Table: "app.events"})
	if err != nil {
		t.Fatal(err)
	}
	cfg := relay.Config{Outbox: ob, Publisher: &nopPublisher{"p"}, Logger: slog.New(slog.DiscardHandler)}
	// Every other plain setting gets a value of its own.
	v := reflect.ValueOf(&cfg).Elem()
	for i := range v.NumField() {
		f := v.Field(i)
		if !f.IsZero() {
			continue
		}
		switch f.Kind() {
		case reflect.Int, reflect.Int64:
			if f.Type() == reflect.TypeFor[time.Duration]() {
				f.SetInt(int64(time.Duration(i+1) * time.Second))
			} else {
				f.SetInt(int64(i + 1))
			}
		case reflect.String:
			f.SetString("value-" + v.Type().Field(i).Name)
		case reflect.Bool:
			f.SetBool(true)
		}
	}
	pc := cdcConfig(cfg, cdcSettings{DSN: "postgres://localhost/test", Slot: "s"})

	got := reflect.ValueOf(pc)
	var shared []string
	for i := range v.NumField() {
		name, typ := v.Type().Field(i).Name, v.Type().Field(i).Type
		g := got.FieldByName(name)
		if !g.IsValid() || g.Type() != typ {
			continue
		}
		shared = append(shared, name)
		if !reflect.DeepEqual(g.Interface(), v.Field(i).Interface()) {
			t.Errorf("pgcdc.Config.%s = %v, want relay.Config.%s = %v", name, g.Interface(), name, v.Field(i).Interface())
		}
	}
	for _, want := range []string{"Publisher", "BatchSize", "MaxAttempts", "InitialBackoff", "MaxBackoff", "ShutdownTimeout", "Logger"} {
		if !slices.Contains(shared, want) {
			t.Errorf("%s is no longer a setting of both configs (shared: %v); update this test", want, shared)
		}
	}
	if pc.Table != "app.events" {
		t.Errorf("pgcdc.Config.Table = %q, want the outbox's table app.events", pc.Table)
	}
}
