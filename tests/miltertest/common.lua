-- Helpers shared by the scripts in this folder (loaded with dofile(here .. "/common.lua")).
-- miltertest exits 1 *silently* on an uncaught error(), so run_main() runs the script body
-- under pcall, prints "FAIL <why>" and re-raises; the pytest side checks the exit status and
-- shows stdout.

sock = "inet:" .. assert(port, "-D port=N is required") .. "@127.0.0.1"

function fail(msg)
    error(msg, 0)
end

function expect(cond, what)
    if not cond then fail(what) end
    mt.echo("ok   " .. what)
end

local function name(reply)
    if reply == 0 then return "(none)" end
    return string.char(reply)
end

-- err: what the mt.* call returned (nil on success); want: an SMFIR_* constant
function expect_reply(conn, err, want, step)
    if err ~= nil then fail(step .. " error: " .. err) end
    local got = mt.getreply(conn)
    if got ~= want then
        fail(string.format("%s: reply %s, wanted %s", step, name(got), name(want)))
    end
    mt.echo("ok   " .. step .. " -> " .. name(got))
end

function run_main(main)
    mt.set_timeout(10)
    local ok, err = pcall(main)
    if not ok then
        mt.echo("FAIL " .. tostring(err))
        error(err, 0)
    end
    mt.echo("ALL CHECKS PASSED")
end
