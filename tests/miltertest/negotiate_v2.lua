-- An old MTA: option negotiation offering protocol version 2, actions 0x3f, steps 0x7f, then
-- the same transaction as tools/capture/miltertest_sessions.lua's "miltertest-negotiate-v2"
-- (captured against libmilter in tests/fixtures/captured/miltertest-negotiate-v2.json), so the
-- pytest side can compare the bridge's bytes with libmilter's.
-- Run: miltertest -D port=N -D here=DIR -s negotiate_v2.lua

dofile(here .. "/common.lua")

run_main(function()
    local c = mt.connect(sock, 40, 0.25)
    -- NB: miltertest 1.6.0 puts its 3rd argument into the *protocol* field and the 4th into
    -- the *actions* field (its man page says actions, steps): actions 0x3f, protocol 0x7f.
    local err = mt.negotiate(c, 2, 0x7F, 0x3F)
    if err ~= nil then fail("negotiate v2: " .. err) end
    -- What the milter asked for, as miltertest decoded the OPTNEG reply: every v2 action
    -- (the policy may make all modifications), no protocol flag at all (the policy decides
    -- every event, and v2 has no SKIP / NR_* to grant).
    for _, flag in ipairs({ SMFIF_ADDHDRS, SMFIF_CHGBODY, SMFIF_ADDRCPT, SMFIF_DELRCPT,
                            SMFIF_CHGHDRS, SMFIF_QUARANTINE }) do
        expect(mt.test_action(c, flag), string.format("action 0x%x requested", flag))
    end
    for _, flag in ipairs({ SMFIF_CHGFROM, SMFIF_ADDRCPT_PAR, SMFIF_SETSYMLIST }) do
        expect(not mt.test_action(c, flag), string.format("action 0x%x (not offered) not requested", flag))
    end
    expect(not mt.test_option(c, 0xFFFFFFFF), "no protocol flags requested")

    expect_reply(c, mt.conninfo(c, "client.example.test", "127.0.0.1"), SMFIR_CONTINUE, "connect")
    expect_reply(c, mt.helo(c, "client.example.test"), SMFIR_CONTINUE, "helo")
    expect_reply(c, mt.mailfrom(c, "<sender@example.test>"), SMFIR_CONTINUE, "mail")
    expect_reply(c, mt.rcptto(c, "<rcpt1@example.test>"), SMFIR_CONTINUE, "rcpt")
    -- mt.header() first sends the DATA ('T') a v2 MTA would never send (miltertest does not
    -- know about versions); it must be answered, but not reach the policy.
    expect_reply(c, mt.header(c, "Subject", "ADDHDR CHGHDR eom-reply"), SMFIR_CONTINUE, "header")
    expect_reply(c, mt.header(c, "X-Change-Me", "original value"), SMFIR_CONTINUE, "header 2")
    expect_reply(c, mt.eoh(c), SMFIR_CONTINUE, "eoh")
    expect_reply(c, mt.bodystring(c, "body\r\n"), SMFIR_CONTINUE, "body")
    expect_reply(c, mt.eom(c), SMFIR_REPLYCODE, "eom -> custom reply")
    expect(mt.eom_check(c, MT_HDRADD, "X-Ref-Added", "added by the reference milter"),
           "eom: header X-Ref-Added added")
    expect(mt.getheader(c, "X-Ref-Added", 0) == "added by the reference milter",
           "eom: getheader(X-Ref-Added, 0)")
    expect(mt.eom_check(c, MT_HDRCHANGE, "X-Change-Me", "changed by the reference milter"),
           "eom: header X-Change-Me changed")
    expect(mt.eom_check(c, MT_SMTPREPLY, "550", "5.7.1", "reference milter rejects at eom"),
           "eom: reply 550 5.7.1 'reference milter rejects at eom'")
    expect(not mt.eom_check(c, MT_BODYCHANGE), "eom: body untouched")
    expect(not mt.eom_check(c, MT_HDRDELETE), "eom: no header deleted")
    mt.disconnect(c)
end)
