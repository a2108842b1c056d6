# Testbed.psm1: the host side of testbed's Hyper-V backend.
#
# Uploaded once per host (hash-checked) and imported by path for every call; each
# call passes its parameters as data (named parameters built from base64 JSON by
# testbed.transport.powershell), never as spliced PowerShell. Every function returns
# one object that testbed serializes with ConvertTo-Json. Windows PowerShell 5.1
# compatible: no ternary, no null-coalescing, no pipeline chain operators, no Start-Job
# (a new powershell.exe): the race's second thread is an in-process runspace.
#
# Facts used here (see CONTEXT.md): WMI namespace root\virtualization\v2;
# ReloadManagementVtl returns 4096 with an Msvm_ConcreteJob (JobState 7 = completed);
# Options 0x1 = override version checks, 0x10 = disable NVMe keepalive;
# Msvm_ShutdownComponent.InitiateShutdown(Force, Reason) returns a status and has no Job
# out parameter; Msvm_ComputerSystem.EnabledState 2 = running, 3 = off.

Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'  # 5.1's progress output slows downloads and copies badly

$script:Namespace = 'root\virtualization\v2'
$script:JobStarted = 4096
$script:JobCompleted = 7
# CIM_ConcreteJob.JobState: 7 Completed, 8 Terminated, 9 Killed, 10 Exception end a job;
# 11 (Service) and vendor states do not.
$script:JobFinished = @(7, 8, 9, 10)
$script:StateOff = 3
$script:CheckpointName = 'testbed-ic-ok'
$script:WorkerLog = 'Microsoft-Windows-Hyper-V-Worker-Admin'
# 14070 (worker process terminated) is a VMMS event: both logs are read, as petri does.
$script:EventLogs = @('Microsoft-Windows-Hyper-V-Worker-Admin', 'Microsoft-Windows-Hyper-V-VMMS-Admin')
$script:Com3MinBuild = 27653
# An integration component's state, read from its WMI component by code (CIM's
# OperationalStatus ValueMap), never from Get-VMIntegrationService: that cmdlet's -Name and
# its PrimaryStatusDescription are localised ('Herunterfahren' on a German host), so a
# name or text match fails on every non-English host. The names below are the English
# texts petri matches (vm_shutdown_ic_status), kept as testbed's stable vocabulary.
$script:IcStatus = @{ 2 = 'OK'; 3 = 'Degraded'; 7 = 'Non-Recoverable Error'; 12 = 'No Contact'; 13 = 'Lost Communication' }

function Initialize-TestbedPipeTail {
    # Serial pipes are read on a background thread that stamps each line with the race's
    # Stopwatch when it arrives, so a line's time does not depend on when PowerShell
    # polls. Compiled only by the race (each call is a new powershell.exe).
    # On Windows PowerShell 5.1 (.NET Framework) Add-Type references only System.dll and
    # System.Management.Automation.dll; NamedPipeClientStream lives in System.Core.dll.
    if ('Testbed.PipeTail' -as [type]) { return }
    Add-Type -ReferencedAssemblies System.Core -TypeDefinition @'
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.IO.Pipes;
using System.Text.RegularExpressions;
using System.Threading;
namespace Testbed {
    // Reads one serial pipe on its own thread, stamping each line with the race's clock.
    // Connects again whenever the pipe is not there yet or went away (as petri's reader
    // does), until Close: a reader that gave up early would make a delivered shutdown
    // look lost. Error keeps the last failure while no connection stands.
    public class PipeTail {
        private readonly List<object[]> lines = new List<object[]>();
        private readonly Stopwatch clock;
        private readonly string name;
        private volatile bool closed;
        private NamedPipeClientStream pipe;
        private Regex watch;
        private double watchAfter;
        private double watchMs = -1;
        private readonly ManualResetEvent matched = new ManualResetEvent(false);
        public string Error = "";
        public volatile bool Connected;
        public PipeTail(string name, Stopwatch clock, int connectMs) {
            this.clock = clock;
            this.name = name;
            var t = new Thread(Read); t.IsBackground = true; t.Start();
        }
        private void Read() {
            while (!closed) {
                try {
                    pipe = new NamedPipeClientStream(".", name, PipeDirection.In);
                    pipe.Connect(250);
                    Connected = true;
                    Error = "";
                    var r = new StreamReader(pipe);
                    string line;
                    while (!closed && (line = r.ReadLine()) != null) {
                        double ms = clock.Elapsed.TotalMilliseconds;
                        lock (lines) { lines.Add(new object[] { ms, line }); Check(ms, line); }
                    }
                } catch (Exception e) { Error = e.Message; Thread.Sleep(50); }
                finally { Connected = false; if (pipe != null) { pipe.Dispose(); } }
            }
        }
        // The shot's anchor: the first line matching pattern that arrives at or after
        // afterMs (lines already read count too), stamped by this reader thread on arrival.
        // Called once per race (each race is its own process and PipeTail).
        public void Watch(string pattern, double afterMs) {
            lock (lines) {
                watch = new Regex(pattern);
                watchAfter = afterMs;
                foreach (var l in lines) { Check((double)l[0], (string)l[1]); }
            }
        }
        private void Check(double ms, string line) {
            if (watch != null && watchMs < 0 && ms >= watchAfter && watch.IsMatch(line)) { watchMs = ms; matched.Set(); }
        }
        // The anchor line's time, or -1 if it has not come within timeoutMs.
        public double WaitMatch(int timeoutMs) { return matched.WaitOne(timeoutMs) ? watchMs : -1; }
        public object[] Lines() { lock (lines) { return lines.ToArray(); } }
        public void Close() { closed = true; }
    }
}
'@
}

# ReloadManagementVtl's own runspace (an in-process thread; see Start-TestbedServicing).
# It makes its CIM session first, says Ready, waits until Sync.ServiceAt on the race's
# Stopwatch (-1: not set yet), then stamps the call's start (ServiceMs) and return
# (ServiceReturnedMs) on that Stopwatch. Any failure is kept in Sync.ServiceError.
$script:ServicingScript = {
    param($Sync, $Clock, $Namespace, $VmId, $Options, $TimeoutHintSecs)
    Set-StrictMode -Version 3.0
    $ErrorActionPreference = 'Stop'
    try {
        $svc = Get-CimInstance -Namespace $Namespace -ClassName Msvm_VirtualSystemGuestManagementService
        $Sync.Ready = $true
        # Spun, not slept: after a leading shot the start may be only a few ms away.
        while ($Sync.ServiceAt -lt 0) { if ($Sync.Abort) { return } }
        $sleep = [int]($Sync.ServiceAt - $Clock.Elapsed.TotalMilliseconds - 20)
        if ($sleep -gt 0) { Start-Sleep -Milliseconds $sleep }
        while ($Clock.Elapsed.TotalMilliseconds -lt $Sync.ServiceAt) { }
        $Sync.ServiceMs = $Clock.Elapsed.TotalMilliseconds
        $r = Invoke-CimMethod -InputObject $svc -MethodName ReloadManagementVtl -Arguments @{ VmId = $VmId; Options = [uint32]$Options; TimeoutHintSecs = [uint32]$TimeoutHintSecs }
        $Sync.ServiceReturnedMs = $Clock.Elapsed.TotalMilliseconds
        $Sync.ServiceReturn = [int]$r.ReturnValue
        if ($r.ReturnValue -eq 4096) { $Sync.ServiceJob = $r.Job }
    } catch {
        $Sync.ServiceError = $_.Exception.Message
    } finally {
        $Sync.Done = $true
    }
}

function Complete-TestbedCimCall {
    # A Msvm method's result that must succeed: 0 is done, 4096 a job that must complete.
    param([Parameter(Mandatory = $true)]$Result, [Parameter(Mandatory = $true)][string]$Method)
    $rv = [int]$Result.ReturnValue
    if ($rv -eq $script:JobStarted) {
        $j = Wait-TestbedJob -JobPath $Result.Job -TimeoutSeconds 60
        if ($j.JobState -ne $script:JobCompleted) { throw "$Method job ended in state $($j.JobState), error $($j.ErrorCode)" }
    } elseif ($rv -ne 0) { throw "$Method returned $rv" }
}

function Test-TestbedVmId {
    param([Parameter(Mandatory = $true)][string]$VmId)
    $parsed = [guid]::Empty
    if (-not [guid]::TryParse($VmId, [ref]$parsed)) { throw "not a VM id: $VmId" }
    $parsed.ToString()
}

function Get-TestbedComputerSystem {
    param([Parameter(Mandatory = $true)][string]$VmId)
    $id = Test-TestbedVmId -VmId $VmId
    $vm = Get-CimInstance -Namespace $script:Namespace -ClassName Msvm_ComputerSystem -Filter "Name='$id'"
    if ($null -eq $vm) { throw "no Hyper-V VM with id $id" }
    $vm
}

function Get-TestbedVmSettings {
    param([Parameter(Mandatory = $true)][string]$VmId)
    $vm = Get-TestbedComputerSystem -VmId $VmId
    Get-CimAssociatedInstance -InputObject $vm -ResultClassName Msvm_VirtualSystemSettingData |
        Where-Object { $_.VirtualSystemType -eq 'Microsoft:Hyper-V:System:Realized' }
}

function Get-TestbedIcState {
    # 'OK', 'No Contact', ... for the VM's shutdown (or heartbeat) component; '' when the
    # VM has none (it is off), 'Status N' for a code outside the table.
    param(
        [Parameter(Mandatory = $true)]$ComputerSystem,
        [string]$ClassName = 'Msvm_ShutdownComponent'
    )
    $ic = Get-CimAssociatedInstance -InputObject $ComputerSystem -ResultClassName $ClassName
    if ($null -eq $ic) { return '' }
    $codes = @($ic.OperationalStatus)  # StrictMode 3 refuses an index past the end
    if ($codes.Count -eq 0) { return '' }
    $code = [int]$codes[0]
    if ($script:IcStatus.ContainsKey($code)) { return $script:IcStatus[$code] }
    "Status $code"
}

function Get-TestbedPreflight {
    param()
    $os = Get-CimInstance -ClassName Win32_OperatingSystem
    $build = [int]$os.BuildNumber
    $isClient = ($os.ProductType -eq 1)
    if ($isClient) {
        $feature = Get-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V-All
        $hyperV = ($null -ne $feature -and $feature.State -eq 'Enabled')
        $featureFix = 'Enable-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V-All (then reboot)'
    } else {
        $feature = Get-WindowsFeature -Name Hyper-V
        $hyperV = ($null -ne $feature -and $feature.Installed)
        $featureFix = 'Install-WindowsFeature -Name Hyper-V -IncludeManagementTools -Restart'
    }
    $key = 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Virtualization'
    $allow = Get-ItemProperty -Path $key -Name AllowFirmwareLoadFromFile -ErrorAction SilentlyContinue
    # COM3 exists only on builds with the additional-COM-ports code path (petri asks for
    # 27653+; the OpenVMM guide: Windows 11 26H1, build 28000+, not 24H2, 25H2 or Server
    # 2025) and only once EnableAdditionalComPorts = 1 (then a VMMS restart).
    $extraCom = Get-ItemProperty -Path $key -Name EnableAdditionalComPorts -ErrorAction SilentlyContinue
    $com3Key = ($null -ne $extraCom -and $extraCom.EnableAdditionalComPorts -eq 1)
    [pscustomobject]@{
        Build                     = $build
        Edition                   = $(if ($isClient) { 'client' } else { 'server' })
        HyperV                    = $hyperV
        HyperVFix                 = $featureFix
        AllowFirmwareLoadFromFile = ($null -ne $allow -and $allow.AllowFirmwareLoadFromFile -eq 1)
        FreeMemoryMB              = [int]($os.FreePhysicalMemory / 1024)
        OpenHclSupported          = ($build -ge 26100)
        Com3Build                 = ($build -ge $script:Com3MinBuild)
        Com3Key                   = $com3Key
        Com3Supported             = ($build -ge $script:Com3MinBuild -and $com3Key)
        PowerShell                = $PSVersionTable.PSVersion.ToString()
    }
}

function Get-TestbedArtifact {
    # Pull an artifact (IGVM file, VHDX) from a URL or a share into the host's cache,
    # keyed by its sha256; a cached copy with the right hash is used as is.
    param(
        [Parameter(Mandatory = $true)][string]$Sha256,
        [Parameter(Mandatory = $true)][string]$FileName,
        [Parameter(Mandatory = $true)][string]$CacheDir,
        [string]$Url = '',
        [string]$SharePath = ''
    )
    $dir = Join-Path $CacheDir $Sha256.ToLower()
    $path = Join-Path $dir $FileName
    if (Test-Path $path) {
        if ((Get-FileHash -Algorithm SHA256 -Path $path).Hash.ToLower() -eq $Sha256.ToLower()) {
            return [pscustomobject]@{ Path = $path; Pulled = $false }
        }
        Remove-Item -Force $path
    }
    if (-not (Test-Path $dir)) { $null = New-Item -ItemType Directory -Path $dir }
    $part = $path + '.part'
    if ($Url) { Invoke-WebRequest -UseBasicParsing -Uri $Url -OutFile $part }
    elseif ($SharePath) { Copy-Item -Path $SharePath -Destination $part -Force }
    else { throw "artifact $FileName ($Sha256) is not in the cache and has no url or share to pull from" }
    $got = (Get-FileHash -Algorithm SHA256 -Path $part).Hash.ToLower()
    if ($got -ne $Sha256.ToLower()) {
        Remove-Item -Force $part
        throw "artifact $FileName pulled with sha256 $got, expected $Sha256"
    }
    Move-Item -Force $part $path
    [pscustomobject]@{ Path = $path; Pulled = $true }
}

function New-TestbedOwnedVm {
    # A Gen2 VM on a differencing disk over a cached image (the cache stays pristine), with
    # static memory, owner-tagged in its Notes for `testbed gc --host`. Configure runs on
    # the new VM. If anything fails, the half-made VM (or its folder) is removed before the
    # error goes up: the caller never learnt its id.
    param(
        [Parameter(Mandatory = $true)][string]$Name,
        [Parameter(Mandatory = $true)][string]$ParentVhd,
        [Parameter(Mandatory = $true)][string]$VmDir,
        [Parameter(Mandatory = $true)][string]$DiskName,
        [Parameter(Mandatory = $true)][string]$Owner,
        [Parameter(Mandatory = $true)][int]$MemoryMB,
        [Parameter(Mandatory = $true)][int]$ProcessorCount,
        [bool]$OpenHcl = $false,
        [Parameter(Mandatory = $true)][scriptblock]$Configure
    )
    $vm = $null
    try {
        if (-not (Test-Path $VmDir)) { $null = New-Item -ItemType Directory -Path $VmDir }
        # The child disk must have its parent's format: a .vhd parent takes a .vhd child.
        $disk = Join-Path $VmDir ([IO.Path]::GetFileNameWithoutExtension($DiskName) + [IO.Path]::GetExtension($ParentVhd))
        $null = New-VHD -Path $disk -ParentPath $ParentVhd -Differencing
        $bytes = [int64]$MemoryMB * 1048576
        if ($OpenHcl) {
            $vm = New-VM -Name $Name -Generation 2 -MemoryStartupBytes $bytes -VHDPath $disk -Path $VmDir -GuestStateIsolationType OpenHCL
        } else {
            $vm = New-VM -Name $Name -Generation 2 -MemoryStartupBytes $bytes -VHDPath $disk -Path $VmDir
        }
        Set-VM -VM $vm -ProcessorCount $ProcessorCount -Notes "testbed-owner=$Owner" -AutomaticCheckpointsEnabled $false -StaticMemory
        $null = & $Configure $vm  # its output must not join the returned object
    } catch {
        if ($null -ne $vm) { $null = Remove-TestbedVm -VmId $vm.Id.ToString() -VmDir $VmDir }
        elseif (Test-Path $VmDir) { Remove-Item -Recurse -Force $VmDir }
        throw
    }
    [pscustomobject]@{ Name = $vm.Name; VmId = $vm.Id.ToString() }
}

function New-TestbedVm {
    # The VM under test: Gen2 with OpenHCL (IGVM firmware from a file, vmbus redirection),
    # serial pipes, and TurnOffOnGuestRestart so a guest reset cannot pass for a live VM.
    param(
        [Parameter(Mandatory = $true)][string]$Name,
        [Parameter(Mandatory = $true)][string]$IgvmPath,
        [Parameter(Mandatory = $true)][string]$VhdPath,
        [Parameter(Mandatory = $true)][string]$VmDir,
        [Parameter(Mandatory = $true)][string]$Owner,
        [int]$MemoryMB = 2048,
        [int]$ProcessorCount = 2,
        [string]$FirmwareCommandLine = '',
        [string]$Com1Pipe = '',
        [string]$Com3Pipe = '',
        [bool]$IncreaseVtl2Memory = $false
    )
    # COM3 is probed, not assumed: Com3 in the answer says whether it was set, Com3Note why not.
    $script:Com3Set = $false
    $script:Com3Note = ''
    $created = New-TestbedOwnedVm -Name $Name -ParentVhd $VhdPath -VmDir $VmDir -DiskName 'vtl0.vhdx' -Owner $Owner -MemoryMB $MemoryMB -ProcessorCount $ProcessorCount -OpenHcl $true -Configure {
        param($vm)
        Set-VMFirmware -VM $vm -EnableSecureBoot Off
        # The worker runs as the VM's own account, which must read the IGVM file (petri
        # grants it with icacls); the path and the account are arguments, never spliced.
        # As petri does, the VM gets its own copy in its folder and the grant is on that: a
        # grant on the shared cached file would outlive the VM, one ACE per VM, until the
        # file's ACL is full (64 KiB, about 1,800 VMs). The copy goes with the folder.
        $igvm = Join-Path $VmDir 'igvm.bin'
        Copy-Item -Path $IgvmPath -Destination $igvm -Force
        $account = 'NT VIRTUAL MACHINE\' + $vm.Id.ToString().ToUpper() + ':R'
        $null = & icacls.exe $igvm /grant $account
        if ($LASTEXITCODE -ne 0) { throw "icacls could not grant $account on $igvm (exit $LASTEXITCODE)" }
        if ($Com1Pipe) { Set-VMComPort -VM $vm -Number 1 -Path "\\.\pipe\$Com1Pipe" }
        $vssd = Get-TestbedVmSettings -VmId $vm.Id.ToString()
        $vssd.GuestFeatureSet = 0x201
        $vssd.FirmwareFile = $igvm
        $vssd.FirmwareParameters = [Text.Encoding]::UTF8.GetBytes($FirmwareCommandLine)
        $vssd.VMBusMessageRedirection = 1
        $vssd.TurnOffOnGuestRestart = $true
        if ($IncreaseVtl2Memory) {
            # As petri does for debug IGVMs: auto placement, 1 GiB of VTL2 address space,
            # 512 MiB of it MMIO (so 512 MiB of VTL2 RAM).
            $vssd.Vtl2AddressSpaceConfigurationMode = 1
            $vssd.Vtl2AddressRangeSize = 1024
            $vssd.Vtl2MmioAddressRangeSize = 512
        }
        $svc = Get-CimInstance -Namespace $script:Namespace -ClassName Msvm_VirtualSystemManagementService
        $text = $vssd | ConvertTo-CimEmbeddedString
        $r = Invoke-CimMethod -InputObject $svc -MethodName ModifySystemSettings -Arguments @{ SystemSettings = $text }
        Complete-TestbedCimCall -Result $r -Method ModifySystemSettings
        if ($Com3Pipe) {
            # COM3 as petri sets it: the VM's third Msvm_SerialPortSettingData, through
            # ModifyResourceSettings (Set-VMComPort documents -Number 1 and 2 only). A VM with
            # two (ARM64 hosts; EnableAdditionalComPorts set but VMMS not restarted) is made
            # without COM3, and the answer says why: counted, never indexed past.
            $ports = @(Get-CimAssociatedInstance -InputObject $vssd -ResultClassName Msvm_SerialPortSettingData)
            if ($ports.Count -lt 3) {
                $script:Com3Note = "COM3 is not offered on this host: a new VM has $($ports.Count) serial ports (Msvm_SerialPortSettingData)"
            } else {
                $ports[2].Connection = @("\\.\pipe\$Com3Pipe")
                $r = Invoke-CimMethod -InputObject $svc -MethodName ModifyResourceSettings -Arguments @{ ResourceSettings = @($ports[2] | ConvertTo-CimEmbeddedString) }
                Complete-TestbedCimCall -Result $r -Method ModifyResourceSettings
                $script:Com3Set = $true
            }
        }
    }
    [pscustomobject]@{ Name = $created.Name; VmId = $created.VmId; Com3 = $script:Com3Set; Com3Note = $script:Com3Note }
}

function New-TestbedL1Vm {
    # Nested Hyper-V: an L1 Windows VM with virtualization extensions exposed, reached
    # later through PowerShell Direct (no network path into it is needed).
    param(
        [Parameter(Mandatory = $true)][string]$Name,
        [Parameter(Mandatory = $true)][string]$VhdPath,
        [Parameter(Mandatory = $true)][string]$VmDir,
        [Parameter(Mandatory = $true)][string]$Owner,
        [int]$MemoryMB = 8192,
        [int]$ProcessorCount = 4,
        [int]$HeartbeatTimeoutSecs = 600
    )
    New-TestbedOwnedVm -Name $Name -ParentVhd $VhdPath -VmDir $VmDir -DiskName 'l1.vhdx' -Owner $Owner -MemoryMB $MemoryMB -ProcessorCount $ProcessorCount -Configure {
        param($vm)
        Set-VMProcessor -VM $vm -ExposeVirtualizationExtensions $true
        Start-VM -VM $vm
        $watch = [Diagnostics.Stopwatch]::StartNew()
        $cs = Get-TestbedComputerSystem -VmId $vm.Id.ToString()
        while ((Get-TestbedIcState -ComputerSystem $cs -ClassName Msvm_HeartbeatComponent) -ne 'OK') {
            if ($watch.Elapsed.TotalSeconds -gt $HeartbeatTimeoutSecs) { throw "L1 VM ${Name}: no heartbeat after $HeartbeatTimeoutSecs s (removed it)" }
            Start-Sleep -Seconds 2
        }
    }
}

function ConvertTo-CimEmbeddedString {
    param([Parameter(Mandatory = $true, ValueFromPipeline = $true)]$CimObject)
    $serializer = [Microsoft.Management.Infrastructure.Serialization.CimSerializer]::Create()
    $bytes = $serializer.Serialize($CimObject, [Microsoft.Management.Infrastructure.Serialization.InstanceSerializationOptions]::None)
    [Text.Encoding]::Unicode.GetString($bytes)
}

function Wait-TestbedIcReady {
    # Start-VM, then wait until the shutdown IC reports OK (the seed test's "IC ready").
    param([Parameter(Mandatory = $true)]$Vm, [Parameter(Mandatory = $true)][int]$TimeoutSecs)
    $id = $Vm.Id.ToString()
    $cs = Get-TestbedComputerSystem -VmId $id
    $watch = [Diagnostics.Stopwatch]::StartNew()
    Start-VM -VM $Vm
    $status = ''
    while ($watch.Elapsed.TotalSeconds -lt $TimeoutSecs) {
        $status = Get-TestbedIcState -ComputerSystem $cs
        if ($status -eq 'OK') { break }
        Start-Sleep -Milliseconds 250
    }
    [pscustomobject]@{ VmId = $id; State = (Get-VM -Id $id).State.ToString(); Ic = $status; ReadyMs = $watch.ElapsedMilliseconds }
}

function Set-TestbedServicingIgvm {
    # The IGVM the next ReloadManagementVtl loads: the VM's own firmware file (its copy in
    # its folder, made by New-TestbedVm) overwritten with a build from the cache, as petri
    # does: Hyper-V does not support changing FirmwareFile while the VM runs, and servicing
    # reads the file anew. The VM's read grant is given again (an overwrite may not keep it).
    # The file's hash comes back as proof of what the next servicing loads.
    param(
        [Parameter(Mandatory = $true)][string]$VmId,
        [Parameter(Mandatory = $true)][string]$VmDir,
        [Parameter(Mandatory = $true)][string]$IgvmPath
    )
    $id = Test-TestbedVmId -VmId $VmId
    $igvm = Join-Path $VmDir 'igvm.bin'
    if (-not (Test-Path -LiteralPath $igvm)) { throw "the VM's firmware file $igvm is not there (a VM made by New-TestbedVm has it)" }
    Copy-Item -LiteralPath $IgvmPath -Destination $igvm -Force
    $account = 'NT VIRTUAL MACHINE\' + $id.ToUpper() + ':R'
    $null = & icacls.exe $igvm /grant $account
    if ($LASTEXITCODE -ne 0) { throw "icacls could not grant $account on $igvm (exit $LASTEXITCODE)" }
    [pscustomobject]@{ VmId = $id; Sha256 = (Get-FileHash -LiteralPath $igvm -Algorithm SHA256).Hash.ToLower() }
}

function Start-TestbedVm {
    param([Parameter(Mandatory = $true)][string]$VmId, [int]$IcReadyTimeoutSecs = 300)
    $id = Test-TestbedVmId -VmId $VmId
    Wait-TestbedIcReady -Vm (Get-VM -Id $id) -TimeoutSecs $IcReadyTimeoutSecs
}

function Save-TestbedCheckpoint {
    # The snapshot reset's starting point: a standard checkpoint (memory included) of the
    # VM running at IC OK. A host or VM type that refuses checkpoints throws here, and the
    # caller falls back to a new VM per iteration, saying why.
    param([Parameter(Mandatory = $true)][string]$VmId)
    $id = Test-TestbedVmId -VmId $VmId
    $vm = Get-VM -Id $id
    Set-VM -VM $vm -CheckpointType Standard
    Checkpoint-VM -VM $vm -SnapshotName $script:CheckpointName
    [pscustomobject]@{ VmId = $id; Checkpoint = $script:CheckpointName }
}

function Restore-TestbedVm {
    # The snapshot reset: turned off if still running, back to the checkpoint taken at IC
    # OK, resumed, and the shutdown IC waited for again (the pipes are new: readers reconnect).
    param([Parameter(Mandatory = $true)][string]$VmId, [int]$IcReadyTimeoutSecs = 300)
    $id = Test-TestbedVmId -VmId $VmId
    $vm = Get-VM -Id $id
    if ($vm.State -ne 'Off') { Stop-VM -VM $vm -TurnOff -Force }
    $checkpoint = Get-VMSnapshot -VM $vm -Name $script:CheckpointName
    Restore-VMSnapshot -VMSnapshot $checkpoint -Confirm:$false
    Wait-TestbedIcReady -Vm $vm -TimeoutSecs $IcReadyTimeoutSecs
}

function Get-TestbedIcStatus {
    param([Parameter(Mandatory = $true)][string]$VmId)
    $cs = Get-TestbedComputerSystem -VmId $VmId
    $ic = Get-CimAssociatedInstance -InputObject $cs -ResultClassName Msvm_ShutdownComponent
    # EnabledState 2 = enabled (CIM_EnabledLogicalElement), as the cmdlet's Enabled says.
    $enabled = ($null -ne $ic -and [int]$ic.EnabledState -eq 2)
    [pscustomobject]@{ VmId = $cs.Name; Status = (Get-TestbedIcState -ComputerSystem $cs); Enabled = $enabled }
}

function Wait-TestbedJob {
    param([Parameter(Mandatory = $true)]$JobPath, [int]$TimeoutSeconds = 120)
    $watch = [Diagnostics.Stopwatch]::StartNew()
    while ($true) {
        $job = Get-CimInstance -InputObject $JobPath
        if ($script:JobFinished -contains [int]$job.JobState) {
            # ErrorCode is a uint16; the HRESULT, when there is one, is in the description.
            return [pscustomobject]@{ Done = $true; JobState = [int]$job.JobState; ErrorCode = [int64]$job.ErrorCode; ErrorDescription = [string]$job.ErrorDescription; Ms = $watch.ElapsedMilliseconds }
        }
        if ($watch.Elapsed.TotalSeconds -gt $TimeoutSeconds) {
            return [pscustomobject]@{ Done = $false; JobState = [int]$job.JobState; ErrorCode = $null; ErrorDescription = ''; Ms = $watch.ElapsedMilliseconds }
        }
        Start-Sleep -Milliseconds 100
    }
}

function Start-TestbedServicing {
    # ReloadManagementVtl's runspace: its own thread in this process, sharing the race's
    # Stopwatch and Sync table. Started, and waited for until it is ready to make its call,
    # before the timed section; it makes the call once Sync.ServiceAt is set.
    param(
        [Parameter(Mandatory = $true)]$Sync,
        [Parameter(Mandatory = $true)]$Clock,
        [Parameter(Mandatory = $true)][string]$VmId,
        [int]$Options = 0,
        [int]$TimeoutHintSecs = 60,
        [int]$ReadyTimeoutSecs = 60
    )
    $ps = [PowerShell]::Create()
    $null = $ps.AddScript($script:ServicingScript.ToString()).AddArgument($Sync).AddArgument($Clock).AddArgument($script:Namespace).AddArgument($VmId).AddArgument($Options).AddArgument($TimeoutHintSecs)
    $handle = $ps.BeginInvoke()
    $watch = [Diagnostics.Stopwatch]::StartNew()
    while (-not $Sync.Ready -and -not $Sync.Done -and $watch.Elapsed.TotalSeconds -lt $ReadyTimeoutSecs) { Start-Sleep -Milliseconds 5 }
    if (-not $Sync.Ready) {
        $Sync.Abort = $true
        $ps.Dispose()
        throw "the servicing runspace was not ready after $($watch.Elapsed.TotalSeconds) s: $($Sync.ServiceError)"
    }
    [pscustomobject]@{ PowerShell = $ps; Handle = $handle }
}

function Wait-TestbedServicing {
    # The servicing runspace's end (its call returned or threw), up to TimeoutSecs: a call
    # that has not returned by then is reported as such, never waited for without end.
    param([Parameter(Mandatory = $true)]$Servicing, [Parameter(Mandatory = $true)]$Sync, [int]$TimeoutSecs = 90)
    if ($Servicing.Handle.AsyncWaitHandle.WaitOne([TimeSpan]::FromSeconds($TimeoutSecs))) {
        $null = $Servicing.PowerShell.EndInvoke($Servicing.Handle)
    } else {
        $Sync.Abort = $true
        if (-not $Sync.ServiceError) { $Sync.ServiceError = "ReloadManagementVtl did not return within $TimeoutSecs s" }
    }
}

function Invoke-TestbedShot {
    # InitiateShutdown at AtMs on the race's Stopwatch (Windows sleeps in timer ticks, 15.6 ms
    # by default: sleep to 20 ms before, then spin), its start and return stamped. With
    # ServiceAfterMs >= 0 servicing is to follow that long after the shot's actual time: set
    # before the call, which may take longer than that. InitiateShutdown(Force, Reason) has no
    # Job out parameter: its 4096 leaves nothing to poll, and $r.Job would throw under
    # StrictMode; a Job is read only if the result has one.
    param(
        [Parameter(Mandatory = $true)]$Ic,
        [Parameter(Mandatory = $true)]$Clock,
        [double]$AtMs = 0,
        $Sync = $null,
        [double]$ServiceAfterMs = -1
    )
    $sleep = [int]($AtMs - $Clock.Elapsed.TotalMilliseconds - 20)
    if ($sleep -gt 0) { Start-Sleep -Milliseconds $sleep }
    while ($Clock.Elapsed.TotalMilliseconds -lt $AtMs) { }
    $t = $Clock.Elapsed.TotalMilliseconds
    if ($ServiceAfterMs -ge 0) { $Sync.ServiceAt = $t + $ServiceAfterMs }
    $r = Invoke-CimMethod -InputObject $Ic -MethodName InitiateShutdown -Arguments @{ Force = $false; Reason = 'testbed' }
    $returned = $Clock.Elapsed.TotalMilliseconds
    $out = $r.PSObject.Properties['Job']
    $job = $null
    if ([int]$r.ReturnValue -eq $script:JobStarted -and $null -ne $out) { $job = $out.Value }
    [pscustomobject]@{ FireMs = $t; FireReturnedMs = $returned; FireReturn = [int]$r.ReturnValue; Job = $job }
}

function Test-TestbedServicingOver {
    # Whether servicing is over: its runspace's call returned (or failed) and the job it
    # started, if any, is in a final state.
    param([Parameter(Mandatory = $true)]$Sync)
    if (-not $Sync.Done) { return $false }
    if ($null -eq $Sync.ServiceJob) { return $true }
    $script:JobFinished -contains [int](Get-CimInstance -InputObject $Sync.ServiceJob).JobState
}

function Wait-TestbedAnchor {
    # When the shot's anchor came, on the race's Stopwatch, while servicing runs on its
    # runspace. 'line': the first line of the watched serial port that matches (stamped by
    # its reader thread on arrival: no polling error). 'job-done': the servicing job seen in
    # a final state (sampled back to back; ResolutionMs is the gap between the last two
    # samples). 'ic-ready': the shutdown IC read OK after it had read anything else since
    # the request (or, if it never left OK, once servicing is over); its states are sampled
    # back to back and every change kept in Transitions, so the stamp is at most
    # ResolutionMs late. Missing says why no anchor came: servicing ended GraceMs ago or
    # the deadline passed.
    param(
        [Parameter(Mandatory = $true)][string]$Kind,
        [Parameter(Mandatory = $true)]$Sync,
        [Parameter(Mandatory = $true)]$Clock,
        [Parameter(Mandatory = $true)]$Vm,
        $Tail = $null,
        [double]$GraceMs = 5000,
        [double]$DeadlineMs = 120000
    )
    $out = [ordered]@{ Ms = $null; ResolutionMs = $null; Missing = ''; Transitions = @() }
    $transitions = New-Object System.Collections.ArrayList
    $over = $null
    $last = $null
    $left = $false
    $prev = $Clock.Elapsed.TotalMilliseconds
    while ($null -eq $out.Ms) {
        $t0 = $Clock.Elapsed.TotalMilliseconds
        if ($Kind -eq 'line') {
            $ms = $Tail.WaitMatch(20)
            if ($ms -ge 0) { $out.Ms = $ms; $out.ResolutionMs = 0.0; break }
        }
        if ($null -eq $over -and (Test-TestbedServicingOver -Sync $Sync)) {
            $over = $Clock.Elapsed.TotalMilliseconds
            if ($Kind -eq 'job-done') { $out.Ms = $over; $out.ResolutionMs = $over - $prev; break }
        }
        if ($Kind -eq 'ic-ready') {
            $state = Get-TestbedIcState -ComputerSystem $Vm
            $t1 = $Clock.Elapsed.TotalMilliseconds
            if ($state -ne $last) { $null = $transitions.Add([pscustomobject]@{ Ms = $t1; State = $state }); $last = $state }
            if ($state -ne 'OK') { if ($null -ne $Sync.ServiceMs) { $left = $true } }  # left since the request
            elseif ($left -or $null -ne $over) { $out.Ms = $t1; $out.ResolutionMs = $t1 - $prev; break }
        }
        $now = $Clock.Elapsed.TotalMilliseconds
        if ($null -ne $over -and $now -gt $over + $GraceMs) {
            $out.Missing = "servicing was over $([int]$GraceMs) ms ago and the $Kind anchor had not come"
            break
        }
        if ($now -gt $DeadlineMs) { $out.Missing = "the $Kind anchor had not come by $([int]$DeadlineMs) ms"; break }
        $prev = $t0
    }
    $out.Transitions = @($transitions)
    [pscustomobject]$out
}

function Invoke-TestbedRace {
    # The race, timed on the host with one Stopwatch. ReloadManagementVtl is made on a
    # runspace of its own and InitiateShutdown on this thread, so neither call waits for the
    # other to return: with OffsetMs >= 0 the shot is fired at the servicing call's actual
    # start + OffsetMs, also while that call is still in flight; with OffsetMs < 0 servicing
    # is requested -OffsetMs after the shot's actual time, also while InitiateShutdown is.
    # Each call's start and return are stamped. Then the jobs are polled and the VM watched
    # until it is off or GraceMs after the later of the two. The IC state is sampled before
    # and after the timed section, never inside it. COM1 (VTL0) and COM3 (OpenHCL) lines
    # carry the same clock.
    param(
        [Parameter(Mandatory = $true)][string]$VmId,
        [double]$OffsetMs = 0,
        [int]$Options = 0,
        [int]$TimeoutHintSecs = 60,
        [bool]$Service = $true,
        [bool]$Shutdown = $true,
        [bool]$AfterReady = $false,
        [double]$GraceMs = 5000,
        [int]$IcReadyTimeoutSecs = 120,
        [string]$Com1Pipe = '',
        [string]$Com3Pipe = '',
        [ValidateSet('request', 'line', 'job-done', 'ic-ready')][string]$FireAfter = 'request',
        [string]$AnchorPort = '',  # Com1 or Com3, for FireAfter 'line'
        [string]$AnchorPattern = ''
    )
    $id = Test-TestbedVmId -VmId $VmId
    $vm = Get-TestbedComputerSystem -VmId $id
    $shutdownIc = Get-CimAssociatedInstance -InputObject $vm -ResultClassName Msvm_ShutdownComponent
    $clock = [Diagnostics.Stopwatch]::StartNew()
    $tails = @{}
    if ($Com1Pipe -or $Com3Pipe) { Initialize-TestbedPipeTail }
    foreach ($port in @(@('Com1', $Com1Pipe), @('Com3', $Com3Pipe))) {
        if ($port[1]) { $tails[$port[0]] = New-Object Testbed.PipeTail($port[1], $clock, 2000) }
    }
    $icBefore = Get-TestbedIcState -ComputerSystem $vm
    $result = [ordered]@{ VmId = $id; IcBefore = $icBefore; OffsetMs = $OffsetMs; StartedUtc = [DateTime]::UtcNow.ToString('o'); StartMs = $clock.Elapsed.TotalMilliseconds }
    $result.FireMs = $null; $result.FireReturnedMs = $null; $result.FireReturn = $null; $result.IcAtFire = $null
    $result.FireJobDone = $null; $result.FireJobState = $null; $result.FireJobErrorCode = $null; $result.FireJobErrorDescription = ''
    $result.ServiceMs = $null; $result.ServiceReturnedMs = $null; $result.ServiceReturn = $null; $result.ServiceError = ''
    $result.JobDone = $null; $result.JobState = $null; $result.JobErrorCode = $null; $result.JobErrorDescription = ''; $result.ServiceDoneMs = $null
    $sync = [hashtable]::Synchronized(@{
            Ready = $false; Done = $false; Abort = $false; ServiceAt = -1.0; ServiceMs = $null; ServiceReturnedMs = $null
            ServiceReturn = $null; ServiceJob = $null; ServiceError = ''
        })
    $result.FireAfter = $FireAfter; $result.AnchorMs = $null; $result.AnchorResolutionMs = $null
    $result.AnchorMissing = ''; $result.FirePlannedMs = $null; $result.IcTransitions = @()
    $servicing = $null
    $shot = $null
    $byOffset = ($Shutdown -and -not $AfterReady -and $FireAfter -eq 'request')
    $byAnchor = ($Shutdown -and -not $AfterReady -and $FireAfter -ne 'request')
    if ($byAnchor -and -not $Service) { throw "a shot after a servicing anchor ($FireAfter) needs servicing (Service)" }
    if ($byAnchor -and $OffsetMs -lt 0) { throw "a shot after an anchor ($FireAfter) is fired a delay after it: OffsetMs $OffsetMs < 0" }
    if ($byAnchor -and $FireAfter -eq 'line') {
        if (-not ($AnchorPort -in @('Com1', 'Com3') -and $tails.ContainsKey($AnchorPort))) {
            throw "a shot after a serial line needs AnchorPort Com1 or Com3 and that port's pipe (got '$AnchorPort')"
        }
        if (-not $AnchorPattern) { throw 'a shot after a serial line needs its AnchorPattern' }
        $null = [regex]$AnchorPattern  # a pattern .NET cannot parse fails here, before anything is started
        # Lines are read only while the pipe is connected: the early ones must not be missed.
        $wait = [Diagnostics.Stopwatch]::StartNew()
        while (-not $tails[$AnchorPort].Connected -and $wait.ElapsedMilliseconds -lt 2000) { Start-Sleep -Milliseconds 10 }
        if (-not $tails[$AnchorPort].Connected) { throw "the $AnchorPort pipe did not connect within 2 s: $($tails[$AnchorPort].Error)" }
    }
    try {
        if ($Service) { $servicing = Start-TestbedServicing -Sync $sync -Clock $clock -VmId $id -Options $Options -TimeoutHintSecs $TimeoutHintSecs }
        # The timed section: the shot, on this thread; servicing, on the runspace's.
        if ($byOffset -and $OffsetMs -lt 0) {
            $lead = -1.0
            if ($Service) { $lead = -$OffsetMs }
            $shot = Invoke-TestbedShot -Ic $shutdownIc -Clock $clock -AtMs 0 -Sync $sync -ServiceAfterMs $lead
        } elseif ($Service) {
            if ($byAnchor -and $FireAfter -eq 'line') { $tails[$AnchorPort].Watch($AnchorPattern, $clock.Elapsed.TotalMilliseconds) }
            $sync.ServiceAt = $clock.Elapsed.TotalMilliseconds
        }
        if ($byAnchor -and $Service) {
            # The shot OffsetMs after an anchor that comes while (or just after) servicing runs.
            $tail = $null
            if ($AnchorPort) { $tail = $tails[$AnchorPort] }
            $anchor = Wait-TestbedAnchor -Kind $FireAfter -Sync $sync -Clock $clock -Vm $vm -Tail $tail -GraceMs $GraceMs -DeadlineMs ($clock.Elapsed.TotalMilliseconds + 1000 * ($TimeoutHintSecs + $IcReadyTimeoutSecs))
            $result.AnchorMs = $anchor.Ms
            $result.AnchorResolutionMs = $anchor.ResolutionMs
            $result.AnchorMissing = $anchor.Missing
            $result.IcTransitions = $anchor.Transitions
            if ($null -ne $anchor.Ms) {
                $result.FirePlannedMs = $anchor.Ms + $OffsetMs
                if ($FireAfter -eq 'ic-ready') { $icBefore = 'OK' }
                $shot = Invoke-TestbedShot -Ic $shutdownIc -Clock $clock -AtMs $result.FirePlannedMs
            }
        }
        if ($byOffset -and $OffsetMs -ge 0) {
            $at = $OffsetMs
            if ($Service) {
                while ($null -eq $sync.ServiceMs -and -not $sync.Done) { }  # the call's actual start
                if ($null -ne $sync.ServiceMs) { $at = $sync.ServiceMs + $OffsetMs }
            }
            $shot = Invoke-TestbedShot -Ic $shutdownIc -Clock $clock -AtMs $at
        }
        if ($Service) {
            Wait-TestbedServicing -Servicing $servicing -Sync $sync -TimeoutSecs ($TimeoutHintSecs + 30)
            $result.ServiceMs = $sync.ServiceMs
            $result.ServiceReturnedMs = $sync.ServiceReturnedMs
            $result.ServiceReturn = $sync.ServiceReturn
            $result.ServiceError = [string]$sync.ServiceError
            if ($null -ne $sync.ServiceJob) {
                $j = Wait-TestbedJob -JobPath $sync.ServiceJob -TimeoutSeconds ($TimeoutHintSecs + 30)
                $result.JobDone = $j.Done
                $result.JobState = $j.JobState
                $result.JobErrorCode = $j.ErrorCode
                $result.JobErrorDescription = $j.ErrorDescription
                $result.ServiceDoneMs = $clock.Elapsed.TotalMilliseconds
            }
        }
        if ($Shutdown -and $AfterReady) {
            # The seed test's order: the IC must come back to OK after servicing, then fire.
            $deadline = $clock.Elapsed.TotalMilliseconds + 1000 * $IcReadyTimeoutSecs
            while ($clock.Elapsed.TotalMilliseconds -lt $deadline) {
                $icBefore = Get-TestbedIcState -ComputerSystem $vm
                if ($icBefore -eq 'OK') { break }
                Start-Sleep -Milliseconds 50
            }
            $shot = Invoke-TestbedShot -Ic $shutdownIc -Clock $clock -AtMs 0
        }
        if ($null -ne $shot) {
            $result.IcAtFire = $icBefore
            $result.FireMs = $shot.FireMs
            $result.FireReturnedMs = $shot.FireReturnedMs
            $result.FireReturn = $shot.FireReturn
            if ($null -ne $shot.Job) {
                $fj = Wait-TestbedJob -JobPath $shot.Job -TimeoutSeconds 60
                $result.FireJobDone = $fj.Done
                $result.FireJobState = $fj.JobState
                $result.FireJobErrorCode = $fj.ErrorCode
                $result.FireJobErrorDescription = $fj.ErrorDescription
            }
        }
        $from = $clock.Elapsed.TotalMilliseconds
        $result.OffMs = $null
        # A refused request (neither 0 nor 4096, or a job of its own that failed) posted
        # nothing: once the servicing job is over there is nothing to wait for.
        $accepted = ($result.FireReturn -eq 0 -or ($result.FireReturn -eq $script:JobStarted -and ($null -eq $result.FireJobState -or $result.FireJobState -eq $script:JobCompleted)))
        $wait = $GraceMs
        if ($Shutdown -and $null -ne $result.FireReturn -and -not $accepted) { $wait = 0 }
        $result.GraceSkipped = ($wait -eq 0)
        while ($clock.Elapsed.TotalMilliseconds -lt $from + $wait) {
            $state = (Get-CimInstance -InputObject $vm).EnabledState
            if ($state -eq $script:StateOff) { $result.OffMs = $clock.Elapsed.TotalMilliseconds; break }
            Start-Sleep -Milliseconds 50
        }
        $result.EndMs = $clock.Elapsed.TotalMilliseconds
        $result.Running = ($null -eq $result.OffMs)
        $result.IcAfter = ''
        if ($result.Running) { $result.IcAfter = Get-TestbedIcState -ComputerSystem $vm }
        foreach ($name in @('Com1', 'Com3')) {
            $result[$name] = @()
            $result[$name + 'Error'] = ''
            if ($tails.ContainsKey($name)) {
                $result[$name] = @($tails[$name].Lines() | ForEach-Object { [pscustomobject]@{ Ms = $_[0]; Line = $_[1] } })
                $result[$name + 'Error'] = $tails[$name].Error
            }
        }
    } finally {
        foreach ($tail in $tails.Values) { $tail.Close() }
        if ($null -ne $servicing) {
            $sync.Abort = $true
            $servicing.PowerShell.Dispose()
        }
    }
    [pscustomobject]$result
}

function Get-TestbedEvents {
    # The worker's events for one VM since a time. With SettleMs, wait up to that long for
    # the event that says how the VM went off (the log is written a moment after).
    param(
        [Parameter(Mandatory = $true)][string]$VmId,
        [Parameter(Mandatory = $true)][string]$SinceUtc,
        [int]$SettleMs = 0
    )
    $id = Test-TestbedVmId -VmId $VmId
    $since = [DateTime]::Parse($SinceUtc).ToLocalTime()
    $offIds = @(18502, 18504, 18508, 18515, 18528, 18539, 18540, 18550, 18560, 18590, 14070)
    $watch = [Diagnostics.Stopwatch]::StartNew()
    while ($true) {
        # Properties is read element by element: under StrictMode, `.Properties.Value` on an
        # event with no properties throws, and would fail the whole call.
        $events = @(Get-WinEvent -FilterHashtable @{ LogName = $script:EventLogs; StartTime = $since } -ErrorAction SilentlyContinue |
                Where-Object { ([string]$_.Message) -match $id -or (@($_.Properties | ForEach-Object { [string]$_.Value }) -contains $id) })
        $settled = @($events | Where-Object { $offIds -contains $_.Id }).Count -gt 0
        if ($settled -or $watch.ElapsedMilliseconds -ge $SettleMs) { break }
        Start-Sleep -Milliseconds 200
    }
    @($events | ForEach-Object {
            [pscustomobject]@{ Id = $_.Id; Log = $_.LogName; TimeUtc = $_.TimeCreated.ToUniversalTime().ToString('o'); Message = [string]$_.Message }
        })
}

function Get-TestbedVmState {
    param([Parameter(Mandatory = $true)][string]$VmId)
    $vm = Get-TestbedComputerSystem -VmId $VmId
    [pscustomobject]@{ VmId = $vm.Name; EnabledState = [int]$vm.EnabledState; Off = ($vm.EnabledState -eq $script:StateOff) }
}

function Remove-TestbedVm {
    # Turn off, remove, and delete the VM's folder (its differencing disk and state).
    param([Parameter(Mandatory = $true)][string]$VmId, [string]$VmDir = '')
    $id = Test-TestbedVmId -VmId $VmId
    $vm = Get-VM -Id $id -ErrorAction SilentlyContinue
    $removed = $false
    if ($null -ne $vm) {
        if ($vm.State -ne 'Off') { Stop-VM -VM $vm -TurnOff -Force }
        # The worker may hold the disks a moment after Off: wait for Off, then retry the
        # folder's removal (petri waits too) instead of leaking it past gc.
        $watch = [Diagnostics.Stopwatch]::StartNew()
        while ((Get-VM -Id $id).State -ne 'Off' -and $watch.Elapsed.TotalSeconds -lt 30) { Start-Sleep -Milliseconds 200 }
        Remove-VM -VM $vm -Force
        $removed = $true
    }
    if ($VmDir) {
        for ($try = 0; $try -lt 20 -and (Test-Path $VmDir); $try++) {
            try { Remove-Item -Recurse -Force $VmDir } catch { Start-Sleep -Milliseconds 500 }
        }
        if (Test-Path $VmDir) { throw "could not remove $VmDir (still in use): testbed gc --host will retry" }
    }
    [pscustomobject]@{ VmId = $id; Removed = $removed }
}

function Get-TestbedOwnedVm {
    # For `testbed gc --host`: the VMs whose Notes carry a testbed owner tag.
    param()
    @(Get-VM | ForEach-Object {
            if ($_.Notes -match 'testbed-owner=(\S+)') {
                # New-VM -Path D makes D\<Name>; testbed's folder (with the disk) is D.
                $dir = $_.Path
                if ((Split-Path -Leaf $dir) -eq $_.Name) { $dir = Split-Path -Parent $dir }
                [pscustomobject]@{ Name = $_.Name; VmId = $_.Id.ToString(); Owner = $Matches[1]; State = $_.State.ToString(); Path = $dir }
            }
        })
}

$public = @(
    'Get-TestbedPreflight', 'Get-TestbedArtifact', 'New-TestbedVm', 'New-TestbedL1Vm', 'Start-TestbedVm',
    'Get-TestbedIcStatus', 'Invoke-TestbedRace', 'Get-TestbedEvents', 'Get-TestbedVmState', 'Remove-TestbedVm',
    'Get-TestbedOwnedVm', 'Wait-TestbedJob', 'Save-TestbedCheckpoint', 'Restore-TestbedVm'
)
Export-ModuleMember -Function $public
