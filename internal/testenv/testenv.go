// Package testenv finds the real services the tests run against. Outside CI a
// missing service skips the test with the command that starts it; under CI
// (CI=true) a missing service fails the test, never skips it.
package testenv

import (
	"net"
	"os"
	"testing"
	"time"
)

// Service names a local service and how to reach it.
type Service struct {
	Name  string
	Addr  string // host:port
	Start string // the command that starts it on this machine
}

var (
	Postgres = Service{"PostgreSQL", envOr("EXACTLY_TEST_PG_ADDR", "127.0.0.1:5432"),
		"pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"}
	MariaDB = Service{"MariaDB", envOr("EXACTLY_TEST_MYSQL_ADDR", "127.0.0.1:3306"),
		"start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"}
	Redis = Service{"Redis", envOr("EXACTLY_TEST_REDIS_ADDR", "127.0.0.1:6379"),
		`redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no`}
	RabbitMQ = Service{"RabbitMQ", envOr("EXACTLY_TEST_AMQP_ADDR", "127.0.0.1:5672"), "rabbitmq-server -detached"}
	NATS     = Service{"NATS", envOr("EXACTLY_TEST_NATS_ADDR", "127.0.0.1:4222"),
		"start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server"}
)

// PostgresDSN is the DSN of the shared test database.
func PostgresDSN() string {
	return envOr("EXACTLY_TEST_PG_DSN", "postgres://postgres@"+Postgres.Addr+"/test?sslmode=disable")
}

// MySQLDSN is the go-sql-driver DSN of the shared MariaDB test database.
func MySQLDSN() string {
	return envOr("EXACTLY_TEST_MYSQL_DSN", "root@tcp("+MariaDB.Addr+")/test?parseTime=true&multiStatements=true")
}

// NATSURL is the URL of the test NATS server.
func NATSURL() string { return "nats://" + NATS.Addr }

// Need skips (or, under CI, fails) the test when the service does not accept
// TCP connections.
func Need(t testing.TB, s Service) {
	t.Helper()
	c, err := net.DialTimeout("tcp", s.Addr, 2*time.Second)
	if err == nil {
		c.Close()
		return
	}
	if InCI() {
		t.Fatalf("%s is not reachable at %s (%v); start it with: %s", s.Name, s.Addr, err, s.Start)
	}
	t.Skipf("%s is not reachable at %s (%v); start it with: %s", s.Name, s.Addr, err, s.Start)
}

// InCI reports whether the tests run under CI, where nothing may be skipped
// for want of a service.
func InCI() bool { return os.Getenv("CI") == "true" || os.Getenv("CI") == "1" }

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
