-- A policy that answers the first body chunk with ACTION_SKIP.
-- -D skip=1: a version-6 offer with SMFIP_SKIP (miltertest's defaults): the bridge asks for
--   SMFIP_SKIP and answers that chunk with SMFIR_SKIP; the MTA then goes to end of message.
-- -D skip=0: a version-6 offer without SMFIP_SKIP (0x400): the bridge answers CONTINUE, and
--   the MTA keeps sending body chunks, which the bridge answers itself.
-- Run: miltertest -D port=N -D here=DIR -D skip=0|1 -s body_skip.lua

dofile(here .. "/common.lua")

local SMFIP_SKIP_FLAG = 0x400
local skip_offered = tonumber(skip) == 1

run_main(function()
    local c = mt.connect(sock, 40, 0.25)
    if not skip_offered then
        -- protocol (3rd argument, see negotiate_v2.lua): everything a v6 MTA offers but SKIP
        local err = mt.negotiate(c, 6, 0x1FFFFF - SMFIP_SKIP_FLAG, 0x1FF)
        if err ~= nil then fail("negotiate v6 without SKIP: " .. err) end
    end
    -- (with skip=1 the first command negotiates implicitly: v6, actions 0x1ff, protocol 0x1fffff)
    expect_reply(c, mt.conninfo(c, "client.example.test", "127.0.0.1"), SMFIR_CONTINUE, "connect")
    expect(mt.test_option(c, SMFIP_SKIP_FLAG) == skip_offered,
           "SMFIP_SKIP requested: " .. tostring(skip_offered))
    expect_reply(c, mt.helo(c, "client.example.test"), SMFIR_CONTINUE, "helo")
    expect_reply(c, mt.mailfrom(c, "<sender@example.test>"), SMFIR_CONTINUE, "mail")
    expect_reply(c, mt.rcptto(c, "<rcpt@example.test>"), SMFIR_CONTINUE, "rcpt")
    expect_reply(c, mt.data(c), SMFIR_CONTINUE, "data")
    expect_reply(c, mt.header(c, "Subject", "skip the body"), SMFIR_CONTINUE, "header")
    expect_reply(c, mt.eoh(c), SMFIR_CONTINUE, "eoh")
    if skip_offered then
        expect_reply(c, mt.bodystring(c, "first chunk\r\n"), SMFIR_SKIP, "body 1 -> skip")
    else
        expect_reply(c, mt.bodystring(c, "first chunk\r\n"), SMFIR_CONTINUE, "body 1 -> continue")
        expect_reply(c, mt.bodystring(c, "second chunk\r\n"), SMFIR_CONTINUE, "body 2 -> continue")
        expect_reply(c, mt.bodystring(c, "third chunk\r\n"), SMFIR_CONTINUE, "body 3 -> continue")
    end
    expect_reply(c, mt.eom(c), SMFIR_CONTINUE, "eom")
    expect(not mt.eom_check(c, MT_HDRADD), "eom: no modification")
    mt.disconnect(c)
end)
