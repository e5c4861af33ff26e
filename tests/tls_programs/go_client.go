// An HTTPS client: waits for a line on stdin, then GETs each URL on one connection and prints
// "PROTO STATUS" per URL.  Usage: go_client h2|h1 URL...
package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	bufio.NewReader(os.Stdin).ReadString('\n')
	transport := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
	if os.Args[1] == "h2" {
		transport.ForceAttemptHTTP2 = true
	} else {
		transport.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	client := &http.Client{Transport: transport}
	for _, url := range os.Args[2:] {
		reply, err := client.Get(url)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		io.ReadAll(reply.Body)
		reply.Body.Close()
		fmt.Println(reply.Proto, reply.StatusCode)
	}
}
