-- miltertest sessions for the fixture capture (tools/capture/capture.py --only miltertest).
-- Run: miltertest -D sock=inet:PORT@127.0.0.1 -s miltertest_sessions.lua
-- Each milter connection is announced on stdout as "SESSION <name>" *before* it is opened, so
-- the capture tool can name the recordings (connections are strictly sequential).
-- The reference milter's behaviour is keyed on the strings sent (see reference_milter.py).
-- miltertest exits 1 silently on an uncaught error(), hence pcall around main().

local sock = sock or "inet:11011@127.0.0.1"

local function fail(msg) error(msg, 0) end

local function expect_reply(conn, err, want, step)
    if err ~= nil then fail(step .. " error: " .. err) end
    local got = mt.getreply(conn)
    if got ~= want then
        fail(string.format("%s: reply %q, wanted %q", step, string.char(got), string.char(want)))
    end
    mt.echo("ok   " .. step .. " -> " .. string.char(got))
end

local function open(name)
    mt.echo("SESSION " .. name)
    return mt.connect(sock, 40, 0.25)
end

local function main()
    mt.set_timeout(10)

    -- 1. one connection, two transactions, an ABORT, UNKNOWN, every envelope/content command
    local c = open("miltertest-full")
    mt.macro(c, SMFIC_CONNECT, "j", "mt.example.test", "{daemon_name}", "miltertest",
             "{client_addr}", "127.0.0.1")
    expect_reply(c, mt.conninfo(c, "client.example.test", "127.0.0.1"), SMFIR_CONTINUE, "connect")
    mt.macro(c, SMFIC_HELO, "{tls_version}", "TLSv1.3")
    expect_reply(c, mt.helo(c, "client.example.test"), SMFIR_CONTINUE, "helo")
    expect_reply(c, mt.unknown(c, "XCAPTURE probe"), SMFIR_CONTINUE, "unknown")
    mt.macro(c, SMFIC_MAIL, "i", "MTQID1", "{mail_addr}", "sender@example.test")
    expect_reply(c, mt.mailfrom(c, "<sender@example.test>", "SIZE=1234", "BODY=8BITMIME"),
                 SMFIR_CONTINUE, "mail")
    mt.macro(c, SMFIC_RCPT, "{rcpt_addr}", "rcpt1@example.test")
    expect_reply(c, mt.rcptto(c, "<rcpt1@example.test>", "NOTIFY=SUCCESS,FAILURE",
                              "ORCPT=rfc822;rcpt1@example.test"), SMFIR_CONTINUE, "rcpt1")
    expect_reply(c, mt.rcptto(c, "<rcpt2@example.test>"), SMFIR_CONTINUE, "rcpt2")
    expect_reply(c, mt.rcptto(c, "<rcpt-reject@example.test>"), SMFIR_REJECT, "rcpt-reject")
    expect_reply(c, mt.rcptto(c, "<rcpt-tempfail@example.test>"), SMFIR_TEMPFAIL, "rcpt-tempfail")
    expect_reply(c, mt.rcptto(c, "<rcpt-reply@example.test>"), SMFIR_REPLYCODE, "rcpt-reply")
    expect_reply(c, mt.data(c), SMFIR_CONTINUE, "data")
    expect_reply(c, mt.header(c, "From", "Sender <sender@example.test>"), SMFIR_CONTINUE, "header From")
    expect_reply(c, mt.header(c, "Subject",
        "PROGRESS ADDHDR INSHDR CHGHDR DELHDR ADDRCPT ADDRCPTPAR DELRCPT CHGFROMARGS SMALLBODY QUARANTINE eom-accept"),
        SMFIR_CONTINUE, "header Subject")
    expect_reply(c, mt.header(c, "X-Change-Me", "original value"), SMFIR_CONTINUE, "header X-Change-Me")
    expect_reply(c, mt.header(c, "X-Delete-Me", "to be deleted"), SMFIR_CONTINUE, "header X-Delete-Me")
    expect_reply(c, mt.eoh(c), SMFIR_CONTINUE, "eoh")
    expect_reply(c, mt.bodystring(c, "first body chunk\r\n"), SMFIR_CONTINUE, "body 1")
    expect_reply(c, mt.bodystring(c, "second body chunk\r\n"), SMFIR_CONTINUE, "body 2")
    expect_reply(c, mt.eom(c), SMFIR_ACCEPT, "eom")
    if not mt.eom_check(c, MT_HDRADD, "X-Ref-Added") then fail("no X-Ref-Added") end
    if not mt.eom_check(c, MT_RCPTADD, "<added@example.test>") then fail("no addrcpt") end
    if not mt.eom_check(c, MT_BODYCHANGE, "Short replacement body.\r\n") then fail("no body change") end
    if not mt.eom_check(c, MT_QUARANTINE) then fail("no quarantine") end
    -- second transaction on the same connection: skipped body, then discarded; then ABORT
    expect_reply(c, mt.mailfrom(c, "<sender@example.test>"), SMFIR_CONTINUE, "mail 2")
    expect_reply(c, mt.rcptto(c, "<rcpt1@example.test>"), SMFIR_CONTINUE, "rcpt 2")
    expect_reply(c, mt.header(c, "Subject", "SKIP eom-discard"), SMFIR_CONTINUE, "header 2")
    expect_reply(c, mt.eoh(c), SMFIR_CONTINUE, "eoh 2")
    expect_reply(c, mt.bodystring(c, "a chunk that makes the milter say SKIP\r\n"), SMFIR_SKIP, "body -> skip")
    expect_reply(c, mt.eom(c), SMFIR_DISCARD, "eom 2 -> discard")
    mt.abort(c)
    mt.disconnect(c)

    -- 2. per-stage verdicts on one connection, each transaction ended by ABORT
    c = open("miltertest-stage-verdicts")
    expect_reply(c, mt.conninfo(c, "client.example.test", "127.0.0.1"), SMFIR_CONTINUE, "connect")
    expect_reply(c, mt.helo(c, "client.example.test"), SMFIR_CONTINUE, "helo")
    expect_reply(c, mt.unknown(c, "XCAPTURE unknown-reply"), SMFIR_REPLYCODE, "unknown -> reply")
    expect_reply(c, mt.mailfrom(c, "<mail-discard@example.test>"), SMFIR_DISCARD, "mail -> discard")
    mt.abort(c)
    expect_reply(c, mt.mailfrom(c, "<mail-accept@example.test>"), SMFIR_ACCEPT, "mail -> accept")
    mt.abort(c)
    expect_reply(c, mt.mailfrom(c, "<sender@example.test>"), SMFIR_CONTINUE, "mail")
    expect_reply(c, mt.rcptto(c, "<rcpt-discard@example.test>"), SMFIR_DISCARD, "rcpt -> discard")
    mt.abort(c)
    expect_reply(c, mt.mailfrom(c, "<sender@example.test>"), SMFIR_CONTINUE, "mail")
    expect_reply(c, mt.rcptto(c, "<rcpt-accept@example.test>"), SMFIR_ACCEPT, "rcpt -> accept")
    mt.abort(c)
    expect_reply(c, mt.mailfrom(c, "<sender@example.test>"), SMFIR_CONTINUE, "mail")
    expect_reply(c, mt.rcptto(c, "<rcpt1@example.test>"), SMFIR_CONTINUE, "rcpt")
    expect_reply(c, mt.header(c, "Subject", "eoh-tempfail"), SMFIR_CONTINUE, "header")
    expect_reply(c, mt.eoh(c), SMFIR_TEMPFAIL, "eoh -> tempfail")
    mt.abort(c)
    expect_reply(c, mt.mailfrom(c, "<sender@example.test>"), SMFIR_CONTINUE, "mail")
    expect_reply(c, mt.rcptto(c, "<rcpt1@example.test>"), SMFIR_CONTINUE, "rcpt")
    expect_reply(c, mt.header(c, "Subject", "header-reject"), SMFIR_REJECT, "header -> reject")
    mt.abort(c)
    expect_reply(c, mt.mailfrom(c, "<sender@example.test>"), SMFIR_CONTINUE, "mail")
    expect_reply(c, mt.rcptto(c, "<rcpt1@example.test>"), SMFIR_CONTINUE, "rcpt")
    expect_reply(c, mt.header(c, "Subject", "body-mlreply"), SMFIR_CONTINUE, "header")
    expect_reply(c, mt.eoh(c), SMFIR_CONTINUE, "eoh")
    expect_reply(c, mt.bodystring(c, "body\r\n"), SMFIR_REPLYCODE, "body -> multi-line reply")
    mt.abort(c)
    mt.disconnect(c)

    -- 3. connect-stage verdicts and the other address families
    c = open("miltertest-connect-ipv6-reject")
    expect_reply(c, mt.conninfo(c, "connect-reject.example.test", "::1"), SMFIR_REJECT, "connect v6 -> reject")
    mt.disconnect(c)
    c = open("miltertest-connect-unspec-tempfail")
    expect_reply(c, mt.conninfo(c, "connect-tempfail.example.test", "unspec"), SMFIR_TEMPFAIL,
                 "connect unspec -> tempfail")
    mt.disconnect(c)
    c = open("miltertest-connect-accept")
    expect_reply(c, mt.conninfo(c, "connect-accept.example.test", "127.0.0.1"), SMFIR_ACCEPT, "connect -> accept")
    mt.disconnect(c)
    c = open("miltertest-helo-reply")
    expect_reply(c, mt.conninfo(c, "client.example.test", "127.0.0.1"), SMFIR_CONTINUE, "connect")
    expect_reply(c, mt.helo(c, "helo-reply.example.test"), SMFIR_REPLYCODE, "helo -> reply")
    mt.disconnect(c)

    -- 4. an old MTA: protocol version 2 offered, v2-era actions and steps
    c = open("miltertest-negotiate-v2")
    -- NB: miltertest 1.6.0 puts its 3rd argument into the protocol field and the 4th into the
    -- actions field (the man page says actions, steps): this call puts actions 0x3f and
    -- protocol 0x7f on the wire
    local err = mt.negotiate(c, 2, 0x7F, 0x3F)
    if err ~= nil then fail("negotiate v2: " .. err) end
    expect_reply(c, mt.conninfo(c, "client.example.test", "127.0.0.1"), SMFIR_CONTINUE, "connect")
    expect_reply(c, mt.helo(c, "client.example.test"), SMFIR_CONTINUE, "helo")
    expect_reply(c, mt.mailfrom(c, "<sender@example.test>"), SMFIR_CONTINUE, "mail")
    expect_reply(c, mt.rcptto(c, "<rcpt1@example.test>"), SMFIR_CONTINUE, "rcpt")
    expect_reply(c, mt.header(c, "Subject", "ADDHDR CHGHDR eom-reply"), SMFIR_CONTINUE, "header")
    expect_reply(c, mt.header(c, "X-Change-Me", "original value"), SMFIR_CONTINUE, "header 2")
    expect_reply(c, mt.eoh(c), SMFIR_CONTINUE, "eoh")
    expect_reply(c, mt.bodystring(c, "body\r\n"), SMFIR_CONTINUE, "body")
    expect_reply(c, mt.eom(c), SMFIR_REPLYCODE, "eom -> reply")
    mt.disconnect(c)
end

local ok, err = pcall(main)
if not ok then
    mt.echo("FAIL " .. tostring(err))
    error(err, 0)
end
mt.echo("miltertest_sessions: ALL DONE")
