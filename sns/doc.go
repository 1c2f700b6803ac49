// Package sns publishes exactly.Messages to Amazon SNS topics (AWS SDK for
// Go v2), with the bodies and attributes of package sqs: a queue
// subscribed with raw message delivery receives what an SQS publish would
// have sent it. On FIFO topics the message ID is the deduplication id
// (SNS drops a re-publish within 5 minutes) and the Key the group id.
// Every subscriber's inbox must still drop the copies SNS and SQS deliver
// beyond that window, and every copy a standard topic or queue delivers.
package sns
