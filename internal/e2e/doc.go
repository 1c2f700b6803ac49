// Package e2e holds end-to-end tests that combine parts: a broker consumer
// with the inbox, under the faults that make brokers deliver twice.
package e2e
